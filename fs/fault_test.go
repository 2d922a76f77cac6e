package fs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// Timeouts and bounds of the fault suite.
const (
	recoverTimeout = 2 * time.Second         // fetch timeout while a transient fault passes
	failTimeout    = 1500 * time.Millisecond // fetch timeout where the fault persists
	eioMargin      = time.Second             // how much later than the timeout EIO may come
	unmountTimeout = 20 * time.Second        // fetch timeout while unmounting: only the unmount can end a read
	wakeDeadline   = 5 * time.Second         // a read blocked on a fault returns this soon after the unmount begins
	outage         = 400 * time.Millisecond  // how long a transient outage lasts
	noProgress     = 250 * time.Millisecond  // the source's no-progress limit while faults pass or persist
	goroutineSlack = 8                       // goroutines above the suite's start allowed after a fault
	heapSlack      = 64 << 20                // heap in use above the suite's start allowed after a fault
)

// span is the part of the overlay file a segment request asks for.
type span struct{ off, n int64 }

func requestSpan(r *http.Request) (span, bool) {
	a, b, ok := strings.Cut(strings.TrimPrefix(r.Header.Get("Range"), "bytes="), "-")
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err1 != nil || err2 != nil || last < first {
		return span{}, false
	}
	return span{first, last - first + 1}, true
}

// faultReq is one segment request the fault answers.
type faultReq struct {
	w       http.ResponseWriter
	r       *http.Request
	i       int64  // the request's number among those faulted, from 1
	ovl     []byte // the whole overlay file
	sp      span
	hold    func()          // keeps the reply open until the request ends, when the unmount phase wants it blocked; otherwise returns at once
	cleared <-chan struct{} // closed when the fault is over
}

func (q *faultReq) body() []byte { return q.ovl[q.sp.off : q.sp.off+q.sp.n] }

// partial starts a 206 reply whose Content-Range names the first n bytes
// of the span and whose Content-Length is length.
func (q *faultReq) partial(n, length int64) {
	h := q.w.Header()
	h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", q.sp.off, q.sp.off+n-1, len(q.ovl)))
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	q.w.WriteHeader(http.StatusPartialContent)
}

// faultCase is one kind of fault a server throws at a mount.
type faultCase struct {
	name string
	// answer replies to a faulted segment request; false lets the real
	// server reply. Nil for the outage, which a proxy makes.
	answer func(q *faultReq) bool
	outage bool
	// transient: in the recovery phase, the requests faulted before the
	// server recovers (an outage lasts the time outage instead); 0 skips
	// that phase.
	transient int
	// perSegment faults only the first request of each segment, so the
	// fetcher's one refetch gets good bytes.
	perSegment bool
	// dead: the persistent fault makes the segment fail for good in the
	// mount (it arrives corrupt over and over); once the fault is over, a
	// new mount serves it.
	dead bool
	// mayFail: while the fault lasts a read may fail with EIO, because the
	// fetcher gives up on such a reply at once; a later read succeeds.
	mayFail bool
	// failFast: the persistent fault fails a read long before the timeout.
	failFast bool
	// blockAt is the faulted request the unmount phase holds open.
	blockAt int64
	// recovered and failed check the mount's stats after the recovery and
	// the persistent phase.
	recovered, failed func(st fetch.Stats, faulted int64) error
}

// The checks of what the fetcher counted. A faulted request the stream
// made may be cancelled by a demand before its error is seen, so errors
// may be fewer than faults.
func errorsCounted(st fetch.Stats, faulted int64) error {
	if st.FetchErrors == 0 || st.FetchErrors > faulted || st.FailedFetches != 0 {
		return fmt.Errorf("%d requests faulted, fetcher counted %d errors and %d failed fetches", faulted, st.FetchErrors, st.FailedFetches)
	}
	return nil
}

func erredAndFailed(st fetch.Stats, faulted int64) error {
	if st.FetchErrors == 0 || st.FailedFetches == 0 {
		return fmt.Errorf("want fetch errors and failed fetches counted")
	}
	return nil
}

func timedOut(st fetch.Stats, faulted int64) error {
	if st.Timeouts == 0 {
		return fmt.Errorf("no timeout counted")
	}
	return nil
}

func erredAndTimedOut(st fetch.Stats, faulted int64) error {
	if st.FetchErrors == 0 || st.Timeouts == 0 {
		return fmt.Errorf("want fetch errors and a timeout counted")
	}
	return nil
}

var faultCases = []faultCase{
	{
		name: "drop mid-segment",
		answer: func(q *faultReq) bool {
			// Headers and half the segment, then the connection drops.
			q.partial(q.sp.n, q.sp.n)
			q.w.Write(q.body()[:q.sp.n/2])
			q.w.(http.Flusher).Flush()
			q.hold()
			panic(http.ErrAbortHandler)
		},
		transient: 3, blockAt: 2,
		recovered: errorsCounted, failed: erredAndTimedOut,
	},
	{
		name: "stall mid-body",
		answer: func(q *faultReq) bool {
			// Headers and half the segment, then silence; the rest comes
			// only once the fault is over.
			q.partial(q.sp.n, q.sp.n)
			q.w.Write(q.body()[:q.sp.n/2])
			q.w.(http.Flusher).Flush()
			q.hold()
			select {
			case <-q.r.Context().Done():
			case <-q.cleared:
				q.w.Write(q.body()[q.sp.n/2:])
			}
			return true
		},
		transient: 3, blockAt: 1,
		recovered: errorsCounted, failed: erredAndTimedOut,
	},
	{
		name: "stall past the timeout",
		answer: func(q *faultReq) bool {
			q.hold()
			select {
			case <-q.r.Context().Done():
				return true
			case <-q.cleared:
				return false
			}
		},
		blockAt: 1,
		failed:  timedOut,
	},
	{
		name: "HTTP 500",
		answer: func(q *faultReq) bool {
			q.hold()
			http.Error(q.w, "injected fault", http.StatusInternalServerError)
			return true
		},
		transient: 3, blockAt: 2,
		recovered: errorsCounted, failed: erredAndTimedOut,
	},
	{
		name: "HTTP 503",
		answer: func(q *faultReq) bool {
			q.hold()
			q.w.Header().Set("Retry-After", "1")
			http.Error(q.w, "injected fault", http.StatusServiceUnavailable)
			return true
		},
		transient: 3, blockAt: 2,
		recovered: errorsCounted, failed: erredAndTimedOut,
	},
	{
		name: "200 instead of 206",
		answer: func(q *faultReq) bool {
			q.hold()
			q.w.Header().Set("Content-Length", strconv.Itoa(len(q.ovl)))
			q.w.WriteHeader(http.StatusOK)
			q.w.Write(q.ovl)
			return true
		},
		transient: 2, mayFail: true, failFast: true, blockAt: 1,
		recovered: func(st fetch.Stats, faulted int64) error {
			if st.FailedFetches == 0 || st.FailedFetches > faulted || st.FetchErrors != st.FailedFetches {
				return fmt.Errorf("%d requests faulted, fetcher counted %d errors and %d failed fetches", faulted, st.FetchErrors, st.FailedFetches)
			}
			return nil
		},
		failed: func(st fetch.Stats, faulted int64) error {
			if st.FailedFetches == 0 || st.Timeouts != 0 {
				return fmt.Errorf("want failed fetches and no timeout")
			}
			return nil
		},
	},
	{
		name: "flipped bit",
		answer: func(q *faultReq) bool {
			b := bytes.Clone(q.body())
			b[len(b)/2] ^= 4
			q.hold()
			q.partial(q.sp.n, q.sp.n)
			q.w.Write(b)
			return true
		},
		transient: 3, perSegment: true, failFast: true, dead: true, blockAt: 2,
		recovered: func(st fetch.Stats, faulted int64) error {
			if st.CorruptSegments == 0 || st.CorruptSegments > faulted || st.FailedFetches != 0 {
				return fmt.Errorf("%d segments corrupted, fetcher counted %d corrupt and %d failed fetches", faulted, st.CorruptSegments, st.FailedFetches)
			}
			return nil
		},
		failed: func(st fetch.Stats, faulted int64) error {
			// Corrupt twice is a failure; three times, failed for good.
			if st.FailedFetches == 0 || st.CorruptSegments < 2 || st.CorruptSegments > 3 {
				return fmt.Errorf("want two or three corrupt downloads and a failed fetch")
			}
			return nil
		},
	},
	{
		name: "truncated body",
		answer: func(q *faultReq) bool {
			short := q.sp.n / 2
			if q.i%2 == 1 {
				// Content-Range as asked, an honest Content-Length of half.
				q.partial(q.sp.n, short)
			} else {
				// Content-Range claiming half of what was asked.
				q.partial(short, short)
			}
			q.w.(http.Flusher).Flush()
			q.hold()
			q.w.Write(q.body()[:short])
			return true
		},
		// A Content-Range other than the one asked for fails the read at
		// once.
		transient: 3, mayFail: true, blockAt: 2,
		recovered: func(st fetch.Stats, faulted int64) error {
			if st.FetchErrors == 0 || st.FetchErrors > faulted {
				return fmt.Errorf("%d requests faulted, fetcher counted %d errors", faulted, st.FetchErrors)
			}
			return nil
		},
		failed: erredAndFailed,
	},
	{
		name:      "server goes away",
		outage:    true,
		transient: 1, blockAt: 1,
		recovered: func(st fetch.Stats, faulted int64) error {
			if st.FetchErrors == 0 || st.FailedFetches != 0 {
				return fmt.Errorf("want fetch errors and no failed fetch")
			}
			return nil
		},
		failed: erredAndTimedOut,
	},
}

// faultSuite holds what the fault kinds share and the suite's totals.
type faultSuite struct {
	v        *vm
	ovl      []byte
	injected atomic.Int64 // requests the faults answered
	verified atomic.Int64 // bytes read through a mount that equal the extract
}

// TestFaultInjection throws each kind of fault at real mounts with the
// streamer running. For each it checks what a reader sees while the fault
// passes (the right bytes) or persists on one segment (EIO within the
// fetch timeout, reads of other segments not held up, then the right bytes
// once the server is fixed, without a remount unless the mount has failed
// the segment for good), that unmounting while a read is blocked on the
// fault wakes the read and succeeds, and that no goroutines or heap are
// left behind. Last, stalls at the metadata fetch: the mount comes up.
func TestFaultInjection(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	ovl, err := os.ReadFile(v.overlay)
	if err != nil {
		t.Fatal(err)
	}
	s := &faultSuite{v: v, ovl: ovl}
	last := v.segments[len(v.segments)-1]
	baseGoroutines := runtime.NumGoroutine()
	baseHeap := heapInuse()
	start := time.Now()
	survived := 0
	kinds := len(faultCases) + 1
	for _, c := range faultCases {
		before := s.injected.Load()
		ok := t.Run(c.name, func(t *testing.T) {
			if c.transient > 0 {
				t.Run("recovers", func(t *testing.T) { s.recovers(t, c) })
			}
			t.Run("persists", func(t *testing.T) { s.persists(t, c, last) })
			t.Run("unmount while blocked", func(t *testing.T) { s.unmountBlocked(t, c, last) })
		})
		if s.settled(t, c.name, before, baseGoroutines, baseHeap) && ok {
			survived++
		}
	}
	before := s.injected.Load()
	ok := t.Run("metadata stall", s.metadataStall)
	if s.settled(t, "metadata stall", before, baseGoroutines, baseHeap) && ok {
		survived++
	}
	t.Logf("fault suite: %d faults injected, %d kinds, %d survived, %d bytes verified, %s",
		s.injected.Load(), kinds, survived, s.verified.Load(), time.Since(start).Round(time.Millisecond))
	if out := os.Getenv("CLOUDLETFS_RELIABILITY_OUT"); out != "" {
		b, _ := json.Marshal(map[string]int64{"faults_injected": s.injected.Load(), "kinds": int64(kinds),
			"survived": int64(survived), "bytes_verified": s.verified.Load()})
		if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// settled checks that everything a fault's mounts started has ended and
// their heap is let go.
func (s *faultSuite) settled(t *testing.T, name string, before int64, baseGoroutines int, baseHeap uint64) bool {
	ok := true
	n, settled := settleGoroutines(baseGoroutines + goroutineSlack)
	if !settled {
		ok = false
		var buf bytes.Buffer
		pprof.Lookup("goroutine").WriteTo(&buf, 1)
		t.Errorf("%s: %d goroutines after unmount, %d before the suite:\n%s", name, n, baseGoroutines, buf.String())
	}
	h := heapInuse()
	if h > baseHeap+heapSlack {
		ok = false
		t.Errorf("%s: heap in use %d MiB after unmount, %d MiB before the suite", name, h>>20, baseHeap>>20)
	}
	t.Logf("%s: %d faults injected; %d goroutines after unmount (%d before the suite), heap in use %d MiB (%d MiB)",
		name, s.injected.Load()-before, n, baseGoroutines, h>>20, baseHeap>>20)
	return ok
}

// settleGoroutines waits, up to a deadline, for the goroutine count to fall
// to limit; it returns the last count seen.
func settleGoroutines(limit int) (int, bool) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= limit {
			return n, true
		}
		if time.Now().After(deadline) {
			return n, false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// faultEnv is one mount behind a server, and a proxy for the outage, with
// a fault hook on the server.
type faultEnv struct {
	s       *faultSuite
	srv     *server
	prx     *proxy
	url     string
	m       *mounted
	faulted atomic.Int64  // requests the hook answered with the fault
	blocked chan struct{} // closed when the held request is being held
	cleared chan struct{} // closed when the fault is over
}

// mountFaulty mounts the overlay at url from a cold cache as `cloudletfs
// mount --policy demand-only` does, with the HTTP source's no-progress
// limit set to limit; the streamer is started by the caller, once the
// fault is in place.
func (s *faultSuite) mountFaulty(t *testing.T, url string, timeout, limit time.Duration) (*mounted, error) {
	t.Helper()
	return s.v.mountOpts(t, url, timeout, false, limit)
}

// setup starts a server (behind a proxy for the outage) and mounts the
// overlay from a cold cache, the streamer not yet started.
func (s *faultSuite) setup(t *testing.T, c faultCase, timeout, limit time.Duration) *faultEnv {
	t.Helper()
	s.v.resetCache(t)
	e := &faultEnv{s: s, blocked: make(chan struct{}), cleared: make(chan struct{})}
	e.srv = newServer(t, filepath.Dir(s.v.overlay), 0, 0)
	e.url = e.srv.URL
	if c.outage {
		e.prx = newProxy(t, e.srv.Listener.Addr().String())
		e.url = "http://" + e.prx.addr
	}
	m, err := s.mountFaulty(t, e.url+"/app.overlay", timeout, limit)
	if err != nil {
		t.Fatal(err)
	}
	e.m = m
	return e
}

// inject puts answer in front of the server for segment requests: all of
// them, or only those of the segment at offset only (if not -1), or the
// first budget (of distinct segments, if perSegment). The request numbered
// holdAt is held open until it ends.
func (e *faultEnv) inject(answer func(q *faultReq) bool, budget int64, perSegment bool, holdAt int64, only int64) {
	var mu sync.Mutex
	seen := map[int64]bool{}
	e.srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if isMeta(r) {
			return false
		}
		sp, ok := requestSpan(r)
		if !ok || only >= 0 && sp.off != only {
			return false
		}
		mu.Lock()
		if perSegment && seen[sp.off] || budget > 0 && e.faulted.Load() >= budget {
			mu.Unlock()
			return false
		}
		seen[sp.off] = true
		i := e.faulted.Add(1)
		mu.Unlock()
		e.s.injected.Add(1)
		hold := func() {}
		if i == holdAt {
			hold = func() {
				close(e.blocked)
				<-r.Context().Done()
			}
		}
		return answer(&faultReq{w: w, r: r, i: i, ovl: e.s.ovl, sp: sp, hold: hold, cleared: e.cleared})
	})
}

// holdAll holds every segment request open until it ends, while the flag
// is set: the outage then cuts them.
func (e *faultEnv) holdAll(holding *atomic.Bool) {
	var once sync.Once
	e.srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if isMeta(r) || !holding.Load() {
			return false
		}
		once.Do(func() { close(e.blocked) })
		<-r.Context().Done()
		return true
	})
}

// goAway takes the server away: new connections are refused, and the ones
// open are cut.
func (e *faultEnv) goAway(t *testing.T) {
	t.Helper()
	e.prx.down()
	if c, err := net.Dial("tcp", e.prx.addr); err == nil {
		c.Close()
		t.Fatal("the server accepts connections while away")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dialling the server while away: %v, want connection refused", err)
	}
}

// readTarget reads the first chunk of the last segment through the mount.
func (e *faultEnv) readTarget(last overlay.Segment) error {
	_, err := readSegment(e.m, last)
	return err
}

// readSegment reads 10 bytes of a segment's first chunk through a mount.
func readSegment(m *mounted, sg overlay.Segment) ([]byte, error) {
	o := m.f.Overlay()
	id := o.Manifest.Order[sg.First]
	return m.readAt(id.Image, int64(id.Index)*int64(o.Header.ChunkSize), 10)
}

// check compares what a read returned with the extract.
func (s *faultSuite) check(img overlay.Image, off int64, got []byte) error {
	if !bytes.Equal(got, s.v.want[img][off:off+int64(len(got))]) {
		return fmt.Errorf("%s bytes %d+%d differ from the extract", img, off, len(got))
	}
	s.verified.Add(int64(len(got)))
	return nil
}

// readers reads ranges across both images from several goroutines at once
// and checks every byte; a read that fails with EIO is tried again up to
// retries times. It returns how many reads failed with EIO.
func (s *faultSuite) readers(t *testing.T, m *mounted, retries int) int64 {
	t.Helper()
	o := m.f.Overlay()
	cs := int64(o.Header.ChunkSize)
	segs := s.v.segments
	var eio atomic.Int64
	var wg sync.WaitGroup
	const goroutines = 4
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 17))
			type extent struct {
				img    overlay.Image
				off, n int64
			}
			var ranges []extent
			// The start of a few segments each, then a few random spans.
			for k := range 4 {
				id := o.Manifest.Order[segs[(g+goroutines*k*3)%len(segs)].First]
				off := int64(id.Index)*cs + 100
				ranges = append(ranges, extent{id.Image, off, min(20000, int64(len(s.v.want[id.Image]))-off)})
			}
			for range 2 {
				img := overlay.Image(rng.IntN(2))
				size := int64(len(s.v.want[img]))
				off := rng.Int64N(size)
				ranges = append(ranges, extent{img, off, min(1+rng.Int64N(200<<10), size-off)})
			}
			for _, r := range ranges {
				for try := 0; ; try++ {
					got, err := m.readAt(r.img, r.off, int(r.n))
					if errors.Is(err, syscall.EIO) && try < retries {
						// A segment whose fetch failed outright fails
						// reads at once until its backoff passes: ask
						// again after a pause longer than the first.
						eio.Add(1)
						<-time.After(200 * time.Millisecond)
						continue
					}
					if err == nil {
						err = s.check(r.img, r.off, got)
					}
					if err != nil {
						t.Errorf("reader %d: %s %d+%d: %v", g, r.img, r.off, r.n, err)
						return
					}
					break
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("readers not done within 30 s")
	}
	return eio.Load()
}

// awaitAndCompare waits for the stream to bring every segment, and
// compares both whole images with the extract.
func (s *faultSuite) awaitAndCompare(t *testing.T, m *mounted) {
	t.Helper()
	m.awaitComplete(t, 20*time.Second)
	for _, img := range overlay.Images {
		got, err := os.ReadFile(m.path(img))
		if err == nil {
			err = s.check(img, 0, got)
		}
		if err == nil && len(got) != len(s.v.want[img]) {
			err = fmt.Errorf("%s: %d bytes, want %d", img, len(got), len(s.v.want[img]))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// recovers: the fault hits the first requests, the stream's or the
// readers', then the server recovers; readers on several goroutines get
// the right bytes, and the stream completes.
func (s *faultSuite) recovers(t *testing.T, c faultCase) {
	e := s.setup(t, c, recoverTimeout, noProgress)
	var faulted int64
	if c.outage {
		// Requests are held until the server goes away, which cuts them;
		// it comes back a moment later.
		var holding atomic.Bool
		holding.Store(true)
		e.holdAll(&holding)
		back := make(chan error, 1)
		go func() {
			select {
			case <-e.blocked:
			case <-time.After(10 * time.Second):
				back <- errors.New("no request reached the server within 10 s")
				return
			}
			holding.Store(false)
			e.prx.down()
			<-time.After(outage)
			back <- e.prx.up()
		}()
		e.m.f.Start()
		s.readers(t, e.m, 0)
		if err := <-back; err != nil {
			t.Fatal(err)
		}
		faulted = e.m.m.Stats().FetchErrors
		s.injected.Add(faulted)
	} else {
		e.inject(c.answer, int64(c.transient), c.perSegment, 0, -1)
		e.m.f.Start()
		retries := 0
		if c.mayFail {
			retries = c.transient
		}
		if n := s.readers(t, e.m, retries); n > 0 {
			t.Logf("%d reads failed with EIO while the fault lasted", n)
		}
		faulted = e.faulted.Load()
		if faulted != int64(c.transient) {
			t.Fatalf("%d requests faulted, want %d", faulted, c.transient)
		}
	}
	if err := c.recovered(e.m.m.Stats(), faulted); err != nil {
		t.Fatalf("%v: %+v", err, e.m.m.Stats())
	}
	s.awaitAndCompare(t, e.m)
}

// persists: the fault hits every request of the last segment (of every
// segment, for the outage) with the stream running; a read of it fails
// with EIO within the fetch timeout, reads of other segments are not held
// up, the stats name the failing segment, and once the fault is over the
// right bytes arrive.
func (s *faultSuite) persists(t *testing.T, c faultCase, last overlay.Segment) {
	e := s.setup(t, c, failTimeout, noProgress)
	if c.outage {
		e.goAway(t)
	} else {
		e.inject(c.answer, 0, false, 0, last.Offset)
	}
	e.m.f.Start()
	start := time.Now()
	err := e.readTarget(last)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read: %v, want EIO", err)
	}
	limit := failTimeout + eioMargin
	if c.failFast {
		limit = failTimeout / 2
	}
	if took > limit {
		t.Fatalf("EIO after %s, want within %s (fetch timeout %s)", took, limit, failTimeout)
	}
	t.Logf("EIO after %s", took.Round(time.Millisecond))
	target := len(s.v.segments) - 1
	if !c.outage {
		// The failing segment holds up no other: reads of others return
		// the right bytes well within the timeout.
		for _, i := range []int{0, target / 3, 2 * target / 3, target - 1} {
			sg := s.v.segments[i]
			start := time.Now()
			got, err := readSegment(e.m, sg)
			id := e.m.f.Overlay().Manifest.Order[sg.First]
			if err == nil {
				err = s.check(id.Image, int64(id.Index)*int64(e.m.f.Overlay().Header.ChunkSize), got)
			}
			if err != nil {
				t.Fatalf("segment %d, while segment %d fails: %v", i, target, err)
			}
			if took := time.Since(start); took > failTimeout/2 {
				t.Fatalf("segment %d took %s while segment %d fails, want well within the fetch timeout %s", i, took, target, failTimeout)
			}
		}
	}
	st := e.m.m.Stats()
	if c.outage {
		s.injected.Add(st.FetchErrors)
	}
	if err := c.failed(st, e.faulted.Load()); err != nil {
		t.Fatalf("%v: %+v", err, st)
	}
	if !failing(st, target, c.dead) {
		// The stream may not have counted a failure yet for a fault that
		// only times out: wait for it, within a deadline.
		deadline := time.Now().Add(10 * time.Second)
		for !failing(e.m.m.Stats(), target, c.dead) {
			if time.Now().After(deadline) {
				t.Fatalf("stats do not name segment %d as failing: %+v", target, e.m.m.Stats().FailingSegments)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// The fault ends.
	close(e.cleared)
	if c.outage {
		if err := e.prx.up(); err != nil {
			t.Fatal(err)
		}
	} else {
		e.srv.setFault(nil)
	}
	if c.dead {
		// Failed for good in this mount: it fails at once, and a new
		// mount serves it.
		start := time.Now()
		if err := e.readTarget(last); !errors.Is(err, syscall.EIO) || time.Since(start) > failTimeout/2 {
			t.Fatalf("read of a segment failed for good: %v after %s, want EIO at once", err, time.Since(start))
		}
		e.m.unmount()
		m, err := s.mountFaulty(t, e.url+"/app.overlay", failTimeout, noProgress)
		if err != nil {
			t.Fatal(err)
		}
		m.f.Start()
		e.m = m
	}
	s.awaitAndCompare(t, e.m)
}

// failing reports whether the stats name segment seg as failing (failed
// for good, if dead).
func failing(st fetch.Stats, seg int, dead bool) bool {
	for _, f := range st.FailingSegments {
		if f.Segment == seg && f.LastError != "" && (!dead || f.RetryInS == -1) {
			return true
		}
	}
	return false
}

// unmountBlocked: a read is blocked on the fault when the mount goes away
// the way `cloudletfs umount` takes it (the fetcher closed, then the file
// system unmounted); the read returns an error at once and the unmount
// succeeds.
func (s *faultSuite) unmountBlocked(t *testing.T, c faultCase, last overlay.Segment) {
	e := s.setup(t, c, unmountTimeout, fetch.DefaultNoProgress)
	var holding atomic.Bool
	if c.outage {
		holding.Store(true)
		e.holdAll(&holding)
	} else {
		e.inject(c.answer, 0, false, c.blockAt, last.Offset)
	}
	read := make(chan error, 1)
	go func() { read <- e.readTarget(last) }()
	e.m.f.Start()
	select {
	case <-e.blocked:
	case err := <-read:
		t.Fatalf("read returned before it blocked on the fault: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no request reached the fault within 10 s")
	}
	if c.outage {
		holding.Store(false)
		e.goAway(t)
		s.injected.Add(1) // the request cut
	}
	select {
	case err := <-read:
		t.Fatalf("read returned while the fault lasts: %v", err)
	default:
	}
	start := time.Now()
	unmounted := make(chan error, 1)
	// As a stop of `cloudletfs mount` does once nothing holds the mount.
	go func() { unmounted <- e.m.s.Unmount(true) }()
	select {
	case err := <-read:
		if err == nil {
			t.Fatal("the blocked read succeeded after the unmount began")
		}
		t.Logf("blocked read returned %q %s after the unmount began", errors.Unwrap(err), time.Since(start).Round(time.Millisecond))
	case <-time.After(wakeDeadline):
		t.Fatalf("read still blocked %s after the unmount began", wakeDeadline)
	}
	select {
	case err := <-unmounted:
		if err != nil {
			t.Fatalf("unmount: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("unmount not done within 10 s")
	}
	if _, err := os.Stat(e.m.path(overlay.Disk)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the image is still there after unmount: %v", err)
	}
}

// metadataStall: the header and metadata requests of a mount stall, before
// the headers and mid-body; the mount retries them on new connections and
// comes up, and serves the right bytes. A stall that never ends fails the
// mount when its deadline passes, saying so.
func (s *faultSuite) metadataStall(t *testing.T) {
	s.v.resetCache(t)
	srv := newServer(t, filepath.Dir(s.v.overlay), 0, 0)
	var n, stalls atomic.Int64
	stalls.Store(4)
	srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if !isMeta(r) {
			return false
		}
		i := n.Add(1)
		if i > stalls.Load() {
			return false
		}
		s.injected.Add(1)
		if sp, ok := requestSpan(r); ok && i%2 == 0 {
			// Headers and half the body, then silence.
			q := &faultReq{w: w, r: r, ovl: s.ovl, sp: sp}
			q.partial(sp.n, sp.n)
			w.Write(q.body()[:sp.n/2])
			w.(http.Flusher).Flush()
		}
		<-r.Context().Done()
		return true
	})
	start := time.Now()
	m, err := s.mountFaulty(t, srv.URL+"/app.overlay", failTimeout, noProgress)
	if err != nil {
		t.Fatalf("mount with %d metadata stalls of %s each: %v", stalls.Load(), noProgress, err)
	}
	t.Logf("mount came up after %d metadata stalls in %s", stalls.Load(), time.Since(start).Round(time.Millisecond))
	if n.Load() <= stalls.Load() {
		t.Fatalf("%d metadata requests, want more than the %d stalled", n.Load(), stalls.Load())
	}
	m.f.Start()
	s.awaitAndCompare(t, m)
	m.unmount()

	// A metadata stall that never ends.
	stalls.Store(1 << 30)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	src, err := fetch.OpenSource(srv.URL+"/app.overlay", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	src.(*fetch.HTTPSource).SetNoProgress(noProgress)
	start = time.Now()
	_, err = fetch.OpenOverlay(ctx, src)
	if err == nil || !strings.Contains(err.Error(), "stalled") || time.Since(start) > 2*time.Second+eioMargin {
		t.Fatalf("mount on a server that never answers: %v after %s, want a stall named within the 2 s deadline", err, time.Since(start))
	}
	t.Logf("mount on a server that never answers: %v", err)
}

// proxy forwards TCP connections to a server; it can go away (refusing
// connections and cutting the ones open) and come back on the same address.
type proxy struct {
	addr, backend string
	wg            sync.WaitGroup

	mu    sync.Mutex
	ln    net.Listener // nil while away
	conns map[net.Conn]bool
}

func newProxy(t *testing.T, backend string) *proxy {
	p := &proxy{backend: backend, conns: map[net.Conn]bool{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(func() {
		p.down()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.pipe(ln, c)
		}
	}()
}

// pipe joins a client connection to a new one to the server.
func (p *proxy) pipe(ln net.Listener, c net.Conn) {
	b, err := net.Dial("tcp", p.backend)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.ln != ln {
		// Went away since the accept.
		p.mu.Unlock()
		c.Close()
		b.Close()
		return
	}
	p.conns[c], p.conns[b] = true, true
	p.mu.Unlock()
	cp := func(dst, src net.Conn) {
		defer p.wg.Done()
		io.Copy(dst, src)
		dst.Close()
		src.Close()
		p.mu.Lock()
		delete(p.conns, dst)
		delete(p.conns, src)
		p.mu.Unlock()
	}
	p.wg.Add(2)
	go cp(b, c)
	go cp(c, b)
}

// down stops listening and cuts every connection.
func (p *proxy) down() {
	p.mu.Lock()
	ln, conns := p.ln, p.conns
	p.ln, p.conns = nil, map[net.Conn]bool{}
	p.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	for c := range conns {
		c.Close()
	}
}

// up listens again on the same address.
func (p *proxy) up() error {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		return fmt.Errorf("listening on %s again: %w", p.addr, err)
	}
	p.serve(ln)
	return nil
}
