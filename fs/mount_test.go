package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/fs"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/serve"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

// vm is a base and a custom VM on disk, the custom one's overlay in a served
// directory, and the files `overlay extract` makes of it.
type vm struct {
	dir      string
	st       *store.Store
	rec      *store.Base
	overlay  string // path of the overlay file
	want     [2][]byte
	segments []overlay.Segment
}

func requireFUSE(t testing.TB) {
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and /dev/fuse")
	}
}

// newVM builds a small VM pair with a few dozen segments of changes.
func newVM(t testing.TB, codec overlay.Codec, segSize int) *vm {
	return newScaledVM(t, codec, segSize, 1, 1)
}

// newScaledVM builds a VM pair scale times the size of newVM's, whose
// changes come in runs of run chunks.
func newScaledVM(t testing.TB, codec overlay.Codec, segSize, scale, run int) *vm {
	t.Helper()
	requireFUSE(t)
	v := &vm{dir: t.TempDir()}
	rng := rand.New(rand.NewPCG(5, 6))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := 0; i < n; i += 8 {
			x := rng.Uint64()
			for j := 0; j < 8 && i+j < n; j++ {
				b[i+j] = byte(x >> (8 * j))
			}
		}
		return b
	}
	const c = 4096
	bd, bm := random(scale*1536*c), random(scale*768*c+100)
	cd, cm := append([]byte(nil), bd...), append([]byte(nil), bm...)
	// Change a third of the disk and half of the memory.
	for i := 0; i+run <= len(cd)/c; i += 3 * run {
		copy(cd[i*c:], random(run*c))
	}
	for i := 0; i+run <= len(cm)/c; i += 2 * run {
		copy(cm[i*c:], random(run*c))
	}
	clear(cm[10*c : 20*c])
	copy(cd[100*c:], bm[:8*c])
	files := map[string][]byte{"base/disk": bd, "base/memory": bm, "base/state": []byte("s0"),
		"app/disk": cd, "app/memory": cm, "app/state": []byte("app state")}
	for name, b := range files {
		p := filepath.Join(v.dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if err = v.reopen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.st.Close() })
	v.rec, err = v.st.Import("base", store.ImportFiles{Disk: filepath.Join(v.dir, "base/disk"),
		Memory: filepath.Join(v.dir, "base/memory"), State: filepath.Join(v.dir, "base/state")}, c, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	base, closeBase, err := v.st.Open(v.rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(closeBase)
	v.overlay = filepath.Join(v.dir, "srv", "app.overlay")
	in := &overlay.Input{Images: [2]io.ReaderAt{bytes.NewReader(cd), bytes.NewReader(cm)},
		Sizes: [2]int64{int64(len(cd)), int64(len(cm))}, State: []byte("app state"), VMConfig: []byte(`{"memory_mb": 8}` + "\n")}
	if _, err := overlay.Build(v.overlay, base, in, overlay.BuildOptions{Codec: codec, SegmentSize: segSize}); err != nil {
		t.Fatal(err)
	}
	// The expected bytes are what `overlay extract` produces.
	f, err := os.Open(v.overlay)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	o, err := overlay.Open(f, fi.Size())
	if err != nil {
		t.Fatal(err)
	}
	v.segments = o.Manifest.Segments
	out := filepath.Join(v.dir, "extracted")
	if err := overlay.Extract(o, base, out, 2, nil); err != nil {
		t.Fatal(err)
	}
	for img, name := range []string{overlay.DiskFile, overlay.MemoryFile} {
		if v.want[img], err = os.ReadFile(filepath.Join(out, name)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(v.want[overlay.Disk], cd) || !bytes.Equal(v.want[overlay.Memory], cm) {
		t.Fatal("extract differs from the custom VM")
	}
	return v
}

// server is a real `cloudletfs serve` handler on 127.0.0.1 with a request
// log and a fault hook in front of it.
type server struct {
	*httptest.Server
	mu    sync.Mutex
	log   []serve.Request
	fault atomic.Pointer[func(w http.ResponseWriter, r *http.Request) bool]
}

func newServer(t testing.TB, dir string, rate float64, rtt time.Duration) *server {
	s := &server{}
	h, err := serve.New(dir, serve.Options{Rate: rate, RTT: rtt, Log: zerolog.Nop(), OnRequest: func(r serve.Request) {
		s.mu.Lock()
		s.log = append(s.log, r)
		s.mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if f := s.fault.Load(); f != nil && (*f)(w, r) {
			return
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

// setFault installs a fault; it returns true when it handled the request.
func (s *server) setFault(f func(w http.ResponseWriter, r *http.Request) bool) {
	if f == nil {
		s.fault.Store(nil)
		return
	}
	s.fault.Store(&f)
}

// segmentRequests returns, in order, the segments requested (by offset).
func (s *server) segmentRequests(segs []overlay.Segment) []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	byOff := map[int64]int{}
	for i, sg := range segs {
		byOff[sg.Offset] = i
	}
	var out []int
	for _, r := range s.log {
		first, _, ok := strings.Cut(strings.TrimPrefix(r.Range, "bytes="), "-")
		off, err := strconv.ParseInt(first, 10, 64)
		if !ok || err != nil {
			continue
		}
		if i, ok := byOff[off]; ok {
			out = append(out, i)
		}
	}
	return out
}

type mounted struct {
	dir   string
	f     *fetch.Fetcher
	m     *fs.Mount
	cache *store.Cache
	s     *session.Session
}

// mount mounts the overlay at url through a fresh fetcher.
func (v *vm) mount(t testing.TB, url string, timeout time.Duration) (*mounted, error) {
	return v.mountWith(t, url, timeout, true)
}

// mountWith mounts the overlay at url as `cloudletfs mount` does, through
// a session, starting the streamer only if stream is set (the demand-only
// policy otherwise).
func (v *vm) mountWith(t testing.TB, url string, timeout time.Duration, stream bool) (*mounted, error) {
	t.Helper()
	return v.mountOpts(t, url, timeout, stream, 0)
}

// mountOpts is mountWith with the HTTP source's no-progress limit (0 for
// the default).
func (v *vm) mountOpts(t testing.TB, url string, timeout time.Duration, stream bool, noProgress time.Duration) (*mounted, error) {
	t.Helper()
	policy := order.StreamDemand
	if !stream {
		policy = order.DemandOnly
	}
	dir := t.TempDir()
	// The session takes the registry while it starts; the tests' own
	// handle lets go of it meanwhile.
	if err := v.st.Close(); err != nil {
		return nil, err
	}
	s, err := session.Open(context.Background(), session.Options{Overlay: url, Mountpoint: dir, StateDir: v.stateDir(),
		Log: zerolog.Nop(), FetchTimeout: timeout, MetadataTimeout: 10 * time.Second, NoProgress: noProgress, Policy: policy})
	if rerr := v.reopen(); rerr != nil {
		if s != nil {
			s.Close()
		}
		return nil, rerr
	}
	if err != nil {
		return nil, err
	}
	mt := &mounted{dir: s.Dir, f: s.Fetcher, m: s.Mount, cache: s.Cache, s: s}
	t.Cleanup(mt.unmount)
	return mt, nil
}

// stateDir is the state directory the base is registered in.
func (v *vm) stateDir() string { return filepath.Join(v.dir, "state") }

// reopen opens the tests' handle on the registry again.
func (v *vm) reopen() (err error) {
	v.st, err = store.Open(v.stateDir(), zerolog.Nop())
	return err
}

// resetCache drops every cached chunk, so the next mount starts cold.
func (v *vm) resetCache(t testing.TB) {
	t.Helper()
	if err := v.st.DropCaches(); err != nil {
		t.Fatal(err)
	}
}

// unmount unmounts and lets go of the cache, so that the next mount of the
// overlay, or a reset, can take it.
func (m *mounted) unmount() { m.s.Close() }

// awaitComplete waits for every segment to be present, failing the test
// with the mount's stats if that takes longer than within.
func (m *mounted) awaitComplete(t testing.TB, within time.Duration) {
	t.Helper()
	select {
	case <-m.f.Complete():
	case <-time.After(within):
		t.Fatalf("stream not complete within %s: %+v", within, m.f.Stats())
	}
}

func (m *mounted) path(img overlay.Image) string { return filepath.Join(m.dir, img.String(), "image") }

// readAt reads through the mount.
func (m *mounted) readAt(img overlay.Image, off int64, n int) ([]byte, error) {
	f, err := os.Open(m.path(img))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	k, err := f.ReadAt(b, off)
	return b[:k], err
}

func mbit(n float64) float64 { return n * 1e6 / 8 }

func TestConcurrentReadersWhileStreaming(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), mbit(40), 2*time.Millisecond)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for r := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 9))
			for range 40 {
				img := overlay.Image(rng.IntN(2))
				size := len(v.want[img])
				off := rng.IntN(size)
				n := min(1+rng.IntN(200<<10), size-off)
				got, err := m.readAt(img, int64(off), n)
				if err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
				if !bytes.Equal(got, v.want[img][off:off+n]) {
					errs <- fmt.Errorf("reader %d: %s bytes %d+%d differ from extract", r, img, off, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := m.f.Stats()
	if st.DemandFetches == 0 || st.Waits == 0 {
		t.Fatalf("readers never waited on a fetch: %+v", st)
	}
	// Every segment arrives once, and the whole images then match.
	m.awaitComplete(t, 60*time.Second)
	for _, img := range overlay.Images {
		got, err := os.ReadFile(m.path(img))
		if err != nil || !bytes.Equal(got, v.want[img]) {
			t.Fatalf("%s: whole image differs from extract (%v)", img, err)
		}
	}
	seen := map[int]int{}
	for _, s := range srv.segmentRequests(v.segments) {
		seen[s]++
	}
	for i := range v.segments {
		if seen[i] == 0 {
			t.Errorf("segment %d was never requested", i)
		}
	}
}

func TestManyWaitersOneFetch(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), mbit(4), 2*time.Millisecond)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	seg := len(v.segments) - 2
	o := m.f.Overlay()
	s := v.segments[seg]
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := o.Manifest.Order[s.First+i%s.Count]
			off := int64(id.Index) * int64(o.Header.ChunkSize)
			got, err := m.readAt(id.Image, off, 100)
			if err != nil || !bytes.Equal(got, v.want[id.Image][off:off+100]) {
				t.Errorf("reader %d: %v or wrong bytes", i, err)
			}
		}()
	}
	wg.Wait()
	n := 0
	for _, r := range srv.segmentRequests(v.segments) {
		if r == seg {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("16 readers of segment %d caused %d fetches, want 1", seg, n)
	}
}

func TestSecondMountFetchesNothing(t *testing.T) {
	v := newVM(t, overlay.CodecXZ, 256<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m.awaitComplete(t, 60*time.Second)
	m.unmount()
	before := len(srv.segmentRequests(v.segments))
	m2, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range overlay.Images {
		got, err := os.ReadFile(m2.path(img))
		if err != nil || !bytes.Equal(got, v.want[img]) {
			t.Fatalf("%s differs on the second mount (%v)", img, err)
		}
	}
	if after := len(srv.segmentRequests(v.segments)); after != before {
		t.Fatalf("the second mount made %d segment requests", after-before)
	}
	if st := m2.f.Stats(); st.BytesFetched != 0 || !st.Complete {
		t.Fatalf("second mount stats: %+v", st)
	}
}

func TestWritesAreCopyOnWrite(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(m.path(overlay.Disk), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	patch := []byte("written through the mount")
	for _, off := range []int64{0, 4090, 123457} { // inside, across and past chunk boundaries
		if _, err := f.WriteAt(patch, off); err != nil {
			t.Fatal(err)
		}
		copy(v.want[overlay.Disk][off:], patch)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	got, err := m.readAt(overlay.Disk, 0, 200000)
	if err != nil || !bytes.Equal(got, v.want[overlay.Disk][:200000]) {
		t.Fatalf("read after write differs (%v)", err)
	}
	base, _ := os.ReadFile(filepath.Join(v.dir, "base/disk"))
	if bytes.Contains(base, patch) {
		t.Fatal("a write reached the base image")
	}
	if st := m.f.Stats(); st.Disk.Modified != 3 { // chunks 0, 1 and 30
		t.Fatalf("modified chunks: %d, want 3", st.Disk.Modified)
	}
	line, err := bufio.NewReader(mustOpen(t, filepath.Join(m.dir, "streams", "chunks_modified"))).ReadString('\n')
	if err != nil || !strings.HasSuffix(line, " disk 0\n") {
		t.Fatalf("chunks_modified starts with %q (%v)", line, err)
	}
}

func mustOpen(t *testing.T, p string) *os.File {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// The faults a server can throw at a mount, and what readers see.
func TestFaults(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	url := srv.URL + "/app.overlay"

	t.Run("unreachable", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		_, err := v.mount(t, "http://"+addr+"/app.overlay", 2*time.Second)
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("ignores range", func(t *testing.T) {
		srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
			r.Header.Del("Range")
			return false
		})
		defer srv.setFault(nil)
		_, err := v.mount(t, url, 2*time.Second)
		if err == nil || !errors.Is(err, fetch.ErrNoRange) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("dies mid-segment and comes back", func(t *testing.T) {
		var dead atomic.Bool
		dead.Store(true)
		var cut atomic.Int64
		thirdCut := make(chan struct{})
		srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
			if !dead.Load() || isMeta(r) {
				return false
			}
			if cut.Add(1) == 3 {
				close(thirdCut)
			}
			// Send headers and half a segment, then drop the connection.
			w.Header().Set("Content-Range", "bytes "+strings.TrimPrefix(r.Header.Get("Range"), "bytes=")+"/999999999")
			w.Header().Set("Content-Length", "65536")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(make([]byte, 1000))
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		})
		defer srv.setFault(nil)
		m, err := v.mount(t, url, 20*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			got, err := m.readAt(overlay.Memory, 0, 300000)
			if err == nil && !bytes.Equal(got, v.want[overlay.Memory][:300000]) {
				err = errors.New("wrong bytes after recovery")
			}
			done <- err
		}()
		// Let three fetches fail, then bring the server back.
		select {
		case <-thirdCut:
		case <-time.After(10 * time.Second):
			t.Fatal("no three failed fetches within 10 s")
		}
		dead.Store(false)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if st := m.f.Stats(); st.FetchErrors == 0 {
			t.Fatalf("no fetch errors counted: %+v", st)
		}
	})
	t.Run("stays dead", func(t *testing.T) {
		// The server fails the last segment from the start: set once the
		// mount is up, the stream could have fetched it already.
		last := v.segments[len(v.segments)-1]
		srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.HasPrefix(r.Header.Get("Range"), fmt.Sprintf("bytes=%d-", last.Offset)) {
				return false
			}
			http.Error(w, "down", http.StatusServiceUnavailable)
			return true
		})
		defer srv.setFault(nil)
		m, err := v.mount(t, url, 1500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		o := m.f.Overlay()
		id := o.Manifest.Order[last.First]
		start := time.Now()
		_, err = m.readAt(id.Image, int64(id.Index)*4096, 10)
		took := time.Since(start)
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read from a dead server: %v, want EIO", err)
		}
		if took > 1500*time.Millisecond+2*time.Second {
			t.Fatalf("read failed after %s, timeout 1.5s", took)
		}
		if st := m.f.Stats(); st.FetchErrors == 0 || st.Timeouts+st.FailedFetches == 0 {
			t.Fatalf("stats: %+v", st)
		}
		if err := m.s.Unmount(false); err != nil {
			t.Fatalf("umount with a dead server: %v", err)
		}
	})
	t.Run("corrupt segment", func(t *testing.T) {
		// Corrupt from the start, before the stream can fetch it whole.
		last := v.segments[len(v.segments)-1]
		total := int64(-1)
		if st, err := os.Stat(v.overlay); err == nil {
			total = st.Size()
		}
		srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.HasPrefix(r.Header.Get("Range"), fmt.Sprintf("bytes=%d-", last.Offset)) {
				return false
			}
			b, _ := os.ReadFile(v.overlay)
			b = b[last.Offset : last.Offset+int64(last.Stored)]
			b[len(b)/2] ^= 4
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", last.Offset, last.Offset+int64(last.Stored)-1, total))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(b)
			return true
		})
		defer srv.setFault(nil)
		m, err := v.mount(t, url, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		o := m.f.Overlay()
		id := o.Manifest.Order[last.First]
		if _, err := m.readAt(id.Image, int64(id.Index)*4096, 10); !errors.Is(err, syscall.EIO) {
			t.Fatalf("read of a corrupt segment: %v, want EIO", err)
		}
		// The kernel may retry a failed read; every fetch that fails has
		// been tried twice: once, and one refetch.
		if st := m.f.Stats(); st.FailedFetches == 0 || st.CorruptSegments != 2*st.FailedFetches {
			t.Fatalf("want two corrupt fetches per failed fetch: %+v", st)
		}
	})
}

// isMeta tells the metadata requests a mount makes before any segment.
func isMeta(r *http.Request) bool {
	rg := r.Header.Get("Range")
	return strings.HasPrefix(rg, "bytes=0-") || strings.HasPrefix(rg, fmt.Sprintf("bytes=%d-", overlay.HeaderSize))
}

func TestMain(m *testing.M) {
	if path := os.Getenv("CLOUDLETFS_MMAP_CHECK"); path != "" {
		if err := mmapCheck(path, os.Getenv("CLOUDLETFS_MMAP_WANT")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// sharedWrites are where the mmap check writes through its shared mapping,
// and what.
var sharedWrites = map[int64]string{4096: "written through a shared mapping", 300 * 4096: "and another page of it"}

// mmapCheck maps path private and shared and compares it with the bytes in
// wantFile. A write to the private mapping must stay private; writes to the
// shared one (sharedWrites) are written back by msync.
func mmapCheck(path, wantFile string) error {
	want, err := os.ReadFile(wantFile)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	size := len(want) / 4096 * 4096
	for _, flags := range []int{syscall.MAP_PRIVATE, syscall.MAP_SHARED} {
		b, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, flags)
		if err != nil {
			return fmt.Errorf("mmap flags %#x: %v", flags, err)
		}
		if !bytes.Equal(b, want[:size]) {
			return fmt.Errorf("mmap flags %#x: mapped bytes differ from extract", flags)
		}
		if flags == syscall.MAP_PRIVATE {
			b[0] ^= 0xff // copy-on-write in this process only
		} else {
			for off, s := range sharedWrites {
				copy(b[off:], s)
			}
			// syscall has no Msync.
			if _, _, e := syscall.Syscall(syscall.SYS_MSYNC, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), syscall.MS_SYNC); e != 0 {
				return fmt.Errorf("msync %s: %v", path, e)
			}
		}
		if err := syscall.Munmap(b); err != nil {
			return fmt.Errorf("munmap flags %#x: %v", flags, err)
		}
	}
	return nil
}

// memory/image serves QEMU's file-backed RAM: it must map shared and
// private, a private mapping's writes must stay private, and a shared
// mapping's writes must reach the store: seen through a fresh descriptor,
// by the daemon, and after a remount, when no page cache is left to hold
// them.
func TestMmapAndStreams(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), mbit(40), 0)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// Map it from another process: a page fault on a FUSE mapping blocks a
	// thread the Go runtime cannot preempt, so the process serving the
	// mount must not fault on it itself.
	want := v.want[overlay.Memory]
	wantFile := filepath.Join(t.TempDir(), "want")
	if err := os.WriteFile(wantFile, want, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "CLOUDLETFS_MMAP_CHECK="+m.path(overlay.Memory), "CLOUDLETFS_MMAP_WANT="+wantFile)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mmap check: %v\n%s", err, out)
	}
	want = append([]byte(nil), want...)
	for off, s := range sharedWrites {
		copy(want[off:], s)
	}
	checkWrites := func(m *mounted, when string) {
		t.Helper()
		got, err := os.ReadFile(m.path(overlay.Memory))
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if got[0] != want[0] {
			t.Fatalf("%s: a private mapping's write reached the file", when)
		}
		for off, s := range sharedWrites {
			if string(got[off:off+int64(len(s))]) != s {
				t.Fatalf("%s: at %d the file reads %q, not the shared mapping's write %q", when, off, got[off:off+int64(len(s))], s)
			}
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: memory/image differs from extract plus the shared mapping's writes", when)
		}
	}
	checkWrites(m, "after msync, through a fresh descriptor")
	for off := range sharedWrites {
		if id := (overlay.ChunkID{Image: overlay.Memory, Index: uint32(off / 4096)}); !m.f.Modified(id) {
			t.Fatalf("after msync the daemon has no write of %s chunk %d", id.Image, id.Index)
		}
	}
	// streams/ show what happened, one event a line.
	for name, wantSub := range map[string]string{"chunks_accessed": " memory ", "chunks_fetched": "segment=", "io": " read memory ", "chunks_modified": " memory 1\n"} {
		b, err := os.ReadFile(filepath.Join(m.dir, "streams", name))
		if err != nil || !strings.Contains(string(b), wantSub) {
			t.Fatalf("streams/%s: %v, %.200q", name, err, b)
		}
	}
	var st fetch.Stats
	b, err := os.ReadFile(filepath.Join(m.dir, "stats"))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil || st.Memory.Total != len(v.want[overlay.Memory])/4096+1 || st.BytesFetched == 0 || st.Memory.Modified != len(sharedWrites) {
		t.Fatalf("stats: %v %+v", err, st)
	}
	m.unmount()
	m2, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	checkWrites(m2, "after a remount")
}
