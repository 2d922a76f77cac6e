package fetch_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/serve"
	"github.com/cloudletfs/cloudletfs/store"
)

// faultServer serves a rig's overlay over real HTTP on 127.0.0.1, with a
// fault hook for the requests of one segment (and optionally another for
// every other segment), and counts and times those requests.
type faultServer struct {
	*httptest.Server
	mu    sync.Mutex
	reqs  map[int]int // segment -> requests
	log   []segRequest
	seg   int // the faulted segment
	fault func(w http.ResponseWriter, r *http.Request, body []byte) bool
	other func(w http.ResponseWriter, r *http.Request, body []byte) bool
}

// segRequest is a request of a segment, as the server saw it arrive.
type segRequest struct {
	seg int
	at  time.Time
}

func newFaultServer(t *testing.T, r *rig, seg int, fault func(w http.ResponseWriter, r *http.Request, body []byte) bool) *faultServer {
	h, err := serve.New(filepath.Dir(r.path), serve.Options{Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ovl, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	byOff := map[int64]int{}
	for i, s := range r.o.Manifest.Segments {
		byOff[s.Offset] = i
	}
	fs := &faultServer{reqs: map[int]int{}, seg: seg, fault: fault}
	fs.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		first, _, _ := strings.Cut(strings.TrimPrefix(req.Header.Get("Range"), "bytes="), "-")
		off, _ := strconv.ParseInt(first, 10, 64)
		if s, ok := byOff[off]; ok {
			fs.mu.Lock()
			fs.reqs[s]++
			fs.log = append(fs.log, segRequest{s, time.Now()})
			hook := fs.other
			fs.mu.Unlock()
			if s == fs.seg {
				hook = fs.fault
			}
			sg := r.o.Manifest.Segments[s]
			if hook != nil && hook(w, req, ovl[sg.Offset:sg.Offset+int64(sg.Stored)]) {
				return
			}
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(fs.Close)
	return fs
}

func (fs *faultServer) requests(seg int) int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.reqs[seg]
}

// setOther sets the hook for the requests of every segment but the
// faulted one.
func (fs *faultServer) setOther(hook func(w http.ResponseWriter, r *http.Request, body []byte) bool) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.other = hook
}

// requestLog returns every request of a segment so far, in order.
func (fs *faultServer) requestLog() []segRequest {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return slices.Clone(fs.log)
}

// slowly answers a range request with body as a link would that takes
// took to carry it: the bytes arrive in even pieces, the last after took.
// It stops when the client cuts the request.
func slowly(took time.Duration) func(w http.ResponseWriter, req *http.Request, body []byte) bool {
	const pieces = 8
	return func(w http.ResponseWriter, req *http.Request, body []byte) bool {
		first, _, _ := strings.Cut(strings.TrimPrefix(req.Header.Get("Range"), "bytes="), "-")
		off, _ := strconv.ParseInt(first, 10, 64)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/*", off, off+int64(len(body))-1))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusPartialContent)
		w.(http.Flusher).Flush()
		t := time.NewTicker(took / pieces)
		defer t.Stop()
		for i := range pieces {
			select {
			case <-t.C:
			case <-req.Context().Done():
				return true
			}
			if _, err := w.Write(body[i*len(body)/pieces : (i+1)*len(body)/pieces]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
		}
		return true
	}
}

// httpFetcher is a fetcher of the rig's overlay through the server, with
// short backoffs and no-progress limit, so a test sees many periods.
func (r *rig) httpFetcher(t *testing.T, srv *faultServer, opt fetch.Options) *fetch.Fetcher {
	src, err := fetch.OpenSource(srv.URL+"/"+filepath.Base(r.path), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	src.(*fetch.HTTPSource).SetNoProgress(300 * time.Millisecond)
	t.Cleanup(func() { src.Close() })
	opt.Log = zerolog.Nop()
	f, err := fetch.New(src, r.o, r.base, r.cache, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// waitOthers waits until every segment but skip has arrived.
func waitOthers(t *testing.T, f *fetch.Fetcher, arrived <-chan int, n, skip int) {
	t.Helper()
	got := map[int]bool{}
	deadline := time.After(20 * time.Second)
	for len(got) < n-1 {
		select {
		case seg := <-arrived:
			if seg == skip {
				t.Fatalf("segment %d arrived despite its fault", seg)
			}
			got[seg] = true
		case <-deadline:
			t.Fatalf("the stream stalled behind failing segment %d: %+v", skip, f.Stats())
		}
	}
}

// firstChunk is where a segment's first chunk lies in its image.
func (r *rig) firstChunk(seg int) (overlay.Image, int64) {
	id := r.o.Manifest.Order[r.o.Manifest.Segments[seg].First]
	return id.Image, int64(id.Index) * int64(r.o.Header.ChunkSize)
}

// A segment that keeps failing does not stop the stream: later segments
// arrive, the stream comes back for it no more often than its backoff
// allows, the stats name it with its reason, and a read of it fails within
// the timeout.
func TestStreamGetsPastAFailingSegment(t *testing.T) {
	cases := []struct {
		name   string
		reason string
		fault  func(w http.ResponseWriter, r *http.Request, body []byte) bool
	}{
		{"500", "500", func(w http.ResponseWriter, r *http.Request, body []byte) bool {
			http.Error(w, "injected", http.StatusInternalServerError)
			return true
		}},
		{"403", "permissions on the server do not let it read the file", func(w http.ResponseWriter, r *http.Request, body []byte) bool {
			http.Error(w, "injected", http.StatusForbidden)
			return true
		}},
		{"404", "no such file", func(w http.ResponseWriter, r *http.Request, body []byte) bool {
			http.Error(w, "injected", http.StatusNotFound)
			return true
		}},
		{"416", "truncated", func(w http.ResponseWriter, r *http.Request, body []byte) bool {
			http.Error(w, "injected", http.StatusRequestedRangeNotSatisfiable)
			return true
		}},
		{"wrong Content-Range", "asked for bytes", func(w http.ResponseWriter, r *http.Request, body []byte) bool {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/*", len(body)-1))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(body)
			return true
		}},
	}
	const (
		backoff, maxBackoff = 20 * time.Millisecond, 100 * time.Millisecond
		timeout             = time.Second
		window              = 1500 * time.Millisecond
	)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := newRig(t)
			const bad = 0
			srv := newFaultServer(t, r, bad, c.fault)
			f := r.httpFetcher(t, srv, fetch.Options{Timeout: timeout, Backoff: backoff, MaxBackoff: maxBackoff})
			n := len(r.o.Manifest.Segments)
			arrived := make(chan int, n)
			f.Observe(func(seg int, _ []overlay.ChunkID, _ bool) { arrived <- seg })
			f.Start()
			waitOthers(t, f, arrived, n, bad)
			// Over a window of many backoff periods the stream tries the
			// segment about once per maxBackoff, not over and over.
			before := srv.requests(bad)
			<-time.After(window)
			tries := srv.requests(bad) - before
			if limit := int(window/maxBackoff) + 8; tries > limit || tries == 0 {
				t.Fatalf("segment %d requested %d times in %s, want 1 to %d (backoff up to %s)", bad, tries, window, limit, maxBackoff)
			}
			st := f.Stats()
			if len(st.FailingSegments) != 1 || st.FailingSegments[0].Segment != bad ||
				!strings.Contains(st.FailingSegments[0].LastError, c.reason) ||
				st.FailingSegments[0].RetryInS < 0 || st.FailingSegments[0].RetryInS > maxBackoff.Seconds() {
				t.Fatalf("failing segments %+v, want segment %d failing with %q", st.FailingSegments, bad, c.reason)
			}
			img, off := r.firstChunk(bad)
			start := time.Now()
			err := f.ReadAt(context.Background(), img, make([]byte, 4096), off)
			if took := time.Since(start); err == nil || took > timeout+time.Second {
				t.Fatalf("read of the failing segment: %v after %s, want an error within %s", err, took, timeout+time.Second)
			}
			if !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("read of the failing segment: %v, want the reason %q", err, c.reason)
			}
			t.Logf("%d tries in %s; read failed after %s: %v", tries, window, time.Since(start).Round(time.Millisecond), err)
		})
	}
}

// A segment that keeps arriving corrupt is downloaded at most three times
// in a mount, however many backoff periods pass, and reads of it then fail
// at once with the reason.
func TestCorruptSegmentDownloadBound(t *testing.T) {
	r := newRig(t)
	const bad = 1
	srv := newFaultServer(t, r, bad, func(w http.ResponseWriter, req *http.Request, body []byte) bool {
		b := bytes.Clone(body)
		b[len(b)/2] ^= 1
		sp := strings.TrimPrefix(req.Header.Get("Range"), "bytes=")
		first, _, _ := strings.Cut(sp, "-")
		off, _ := strconv.ParseInt(first, 10, 64)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/*", off, off+int64(len(b))-1))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(b)
		return true
	})
	const maxBackoff, timeout = 100 * time.Millisecond, time.Second
	f := r.httpFetcher(t, srv, fetch.Options{Timeout: timeout, Backoff: 20 * time.Millisecond, MaxBackoff: maxBackoff})
	n := len(r.o.Manifest.Segments)
	arrived := make(chan int, n)
	f.Observe(func(seg int, _ []overlay.ChunkID, _ bool) { arrived <- seg })
	f.Start()
	waitOthers(t, f, arrived, n, bad)
	img, off := r.firstChunk(bad)
	// Readers ask for it all through the window too.
	end := time.Now().Add(20 * maxBackoff)
	reads := 0
	for time.Now().Before(end) {
		start := time.Now()
		err := f.ReadAt(context.Background(), img, make([]byte, 100), off)
		if err == nil || !strings.Contains(err.Error(), "corrupt") {
			t.Fatalf("read of the corrupt segment: %v, want an error naming the corruption", err)
		}
		if took := time.Since(start); took > time.Second+500*time.Millisecond {
			t.Fatalf("read of the corrupt segment failed after %s", took)
		}
		reads++
		<-time.After(maxBackoff / 4)
	}
	if got := srv.requests(bad); got > 3 || got < 3 {
		t.Fatalf("the corrupt segment was downloaded %d times in %s (%d reads), want exactly 3", got, 20*maxBackoff, reads)
	}
	st := f.Stats()
	if len(st.FailingSegments) != 1 || st.FailingSegments[0].Segment != bad || st.FailingSegments[0].RetryInS != -1 ||
		!strings.Contains(st.FailingSegments[0].LastError, "corrupt") || st.CorruptSegments != 3 {
		t.Fatalf("stats: %+v, want segment %d failed for good as corrupt", st, bad)
	}
	// Once failed for good, a read fails at once: well within the
	// timeout, which it would wait out if it waited at all.
	start := time.Now()
	if err := f.ReadAt(context.Background(), img, make([]byte, 100), off); !errors.Is(err, fetch.ErrFailing) || time.Since(start) > timeout/4 {
		t.Fatalf("read after the bound: %v after %s, want ErrFailing at once", err, time.Since(start))
	}
}

// fullCache is the real cache with WriteSegment failing as a full disk does
// while full is set: a seam for a state the test cannot make by filling
// the disk.
type fullCache struct {
	*store.Cache
	mu   sync.Mutex
	full bool
}

func (c *fullCache) WriteSegment(seg int, chunks []store.ChunkData) error {
	c.mu.Lock()
	full := c.full
	c.mu.Unlock()
	if full {
		return fmt.Errorf("write cache/disk: %w", syscall.ENOSPC)
	}
	return c.Cache.WriteSegment(seg, chunks)
}

// logLines counts log lines that contain a string.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logLines) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.buf.String(), s)
}

// When the cache cannot store segments, readers get the right bytes from
// memory, one line is logged, nothing is marked present, and once the
// cache takes writes again the segments are fetched again and cached.
func TestCacheFullServesFromMemory(t *testing.T) {
	r := newRig(t)
	cache := &fullCache{Cache: r.cache, full: true}
	var log logLines
	f, err := fetch.New(r.src, r.o, r.base, cache, fetch.Options{Timeout: 5 * time.Second, Backoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
		Log: zerolog.New(&log)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	n := len(r.o.Manifest.Segments)
	for seg := range n {
		img, off := r.firstChunk(seg)
		got := make([]byte, 4096)
		if err := f.ReadAt(context.Background(), img, got, off); err != nil {
			t.Fatalf("segment %d: read with the cache full: %v", seg, err)
		}
		if !bytes.Equal(got, r.image(t, img)[off:off+4096]) {
			t.Fatalf("segment %d: wrong bytes from memory", seg)
		}
	}
	st := f.Stats()
	if st.SegmentsPresent != 0 || st.UncachedSegments < int64(n) || len(st.FailingSegments) != n {
		t.Fatalf("stats with the cache full: %+v", st)
	}
	if c := log.count("the cache cannot store"); c != 1 {
		t.Fatalf("%d log lines about the full cache for %d segments, want 1:\n%s", c, n, log.buf.String())
	}
	cache.mu.Lock()
	cache.full = false
	cache.mu.Unlock()
	f.Start()
	awaitComplete(t, f, 10*time.Second, "not complete 10 s after the cache took writes again")
}

// image returns the bytes of one of the rig's custom images, as extracted.
func (r *rig) image(t *testing.T, img overlay.Image) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "x")
	if err := overlay.Extract(r.openFile(t), r.base, out, 1, nil); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(out, []string{overlay.DiskFile, overlay.MemoryFile}[img]))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openFile opens the overlay file itself, for extraction.
func (r *rig) openFile(t *testing.T) *overlay.Overlay {
	f, err := os.Open(r.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, _ := f.Stat()
	o, err := overlay.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// A segment an earlier mount cached is checked the first time this mount
// serves it: a copy damaged on disk is fetched again, not served.
func TestCachedSegmentReverified(t *testing.T) {
	r := newRig(t)
	f := r.fetcher(t, 5*time.Second)
	f.Start()
	awaitComplete(t, f, 10*time.Second, "not complete")
	f.Close()
	// Damage the cached copy of segment 2's first chunk.
	img, off := r.firstChunk(2)
	p := filepath.Join(filepath.Dir(r.path), "st", "cache", r.o.ID.String(), img.String())
	fh, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fh.WriteAt([]byte("damaged"), off+10); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	f2 := r.fetcher(t, 5*time.Second)
	want := [2][]byte{r.image(t, overlay.Disk), r.image(t, overlay.Memory)}
	for seg := range r.o.Manifest.Segments {
		img, off := r.firstChunk(seg)
		got := make([]byte, 4096)
		if err := f2.ReadAt(context.Background(), img, got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[img][off:off+4096]) {
			t.Fatalf("segment %d: wrong bytes", seg)
		}
	}
	st := f2.Stats()
	if st.CacheBadSegments != 1 || st.SegmentsDemanded != 1 || st.BytesFetched != int64(r.o.Manifest.Segments[2].Stored) || !st.Complete {
		t.Fatalf("stats of the second mount: %+v, want segment 2 alone fetched again", st)
	}
}

// A 503 with Retry-After holds the next request of that segment back for
// as long as the server asked, and a reader waiting on it is then served.
func TestRetryAfterHonoured(t *testing.T) {
	r := newRig(t)
	const bad = 2
	var mu sync.Mutex
	var times []time.Time
	srv := newFaultServer(t, r, bad, func(w http.ResponseWriter, req *http.Request, body []byte) bool {
		mu.Lock()
		defer mu.Unlock()
		times = append(times, time.Now())
		if len(times) > 1 {
			return false
		}
		w.Header().Set("Retry-After", "1")
		http.Error(w, "injected", http.StatusServiceUnavailable)
		return true
	})
	f := r.httpFetcher(t, srv, fetch.Options{Timeout: 5 * time.Second})
	img, off := r.firstChunk(bad)
	if err := f.ReadAt(context.Background(), img, make([]byte, 100), off); err != nil {
		t.Fatalf("read after a 503 with Retry-After: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(times) != 2 {
		t.Fatalf("%d requests of the segment, want 2", len(times))
	}
	if gap := times[1].Sub(times[0]); gap < time.Second {
		t.Fatalf("asked again %s after a Retry-After of 1 s", gap)
	}
}

// A 503 with Retry-After quiets the whole source for as long as the server
// asked: the stream sends no request of any segment before then, not just
// none of the segment that got the 503.
func TestRetryAfterHoldsTheSource(t *testing.T) {
	r := newRig(t)
	const bad = 0
	var once sync.Once
	srv := newFaultServer(t, r, bad, func(w http.ResponseWriter, req *http.Request, body []byte) bool {
		refused := false
		once.Do(func() {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "injected", http.StatusServiceUnavailable)
			refused = true
		})
		return refused
	})
	f := r.httpFetcher(t, srv, fetch.Options{Timeout: 5 * time.Second})
	f.Start()
	awaitComplete(t, f, 15*time.Second, "not complete 15 s after a Retry-After of 1 s")
	log := srv.requestLog()
	if len(log) < 2 || log[0].seg != bad {
		t.Fatalf("requests %+v: want segment %d first", log, bad)
	}
	// The client hears the 503 after the server sent it: any later request
	// is at least the Retry-After after it, less only clock granularity.
	const margin = 20 * time.Millisecond
	for _, q := range log[1:] {
		if gap := q.at.Sub(log[0].at); gap < time.Second-margin {
			var seen []string
			for _, q := range log {
				seen = append(seen, fmt.Sprintf("%d at +%s", q.seg, q.at.Sub(log[0].at).Round(time.Millisecond)))
			}
			t.Fatalf("segment %d asked for %s after a 503 with Retry-After: 1 (requests: %s)", q.seg, gap.Round(time.Millisecond), strings.Join(seen, ", "))
		}
	}
}
