package fetch_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// A reader waiting on a segment that keeps failing does not hold the
// stream back while its fetch only waits to try again: every other
// segment arrives while the reader still waits.
func TestWaitingReaderDoesNotFreezeStream(t *testing.T) {
	r := newRig(t)
	const bad = 0
	srv := newFaultServer(t, r, bad, answer500)
	f := r.httpFetcher(t, srv, fetch.Options{Timeout: 3 * time.Second, Backoff: 200 * time.Millisecond, MaxBackoff: time.Second})
	done := streamWhileReaderWaits(t, r, srv, f, bad, "the stream stood aside while it waited")
	if err := <-done; !errors.Is(err, fetch.ErrTimeout) {
		t.Fatalf("read of the failing segment: %v, want a timeout", err)
	}
}

// On a link where a segment takes longer to arrive than a reader's fetch
// waits between tries, the retries of that reader's failing segment do not
// cut the stream's request over and over: the other segments stream while
// the reader still waits. Only a demand's first try preempts the stream.
func TestDemandRetriesDoNotStopSlowStream(t *testing.T) {
	r := newRig(t)
	const bad = 0
	srv := newFaultServer(t, r, bad, answer500)
	// Longer than the pause between a reader's tries (at most 1 s).
	const took = 1200 * time.Millisecond
	srv.setOther(slowly(took))
	n := len(r.o.Manifest.Segments)
	timeout := time.Duration(n+4) * 2 * took
	f := r.httpFetcher(t, srv, fetch.Options{Timeout: timeout, Backoff: 50 * time.Millisecond, MaxBackoff: time.Second})
	streamWhileReaderWaits(t, r, srv, f, bad, "the reader's retries cut the stream, each segment "+took.String()+" long")
	if st := f.Stats(); st.StreamPreemptions != 0 {
		t.Fatalf("%d preemptions of the stream by a reader that only retried: %+v", st.StreamPreemptions, st)
	}
	t.Logf("%d segments streamed while the reader retried segment %d %d times", n-1, bad, srv.requests(bad))
}

// answer500 fails every request of the faulted segment.
func answer500(w http.ResponseWriter, req *http.Request, body []byte) bool {
	http.Error(w, "injected", http.StatusInternalServerError)
	return true
}

// streamWhileReaderWaits has a reader wait on segment bad, which keeps
// failing, starts the stream, and returns once every other segment has
// arrived while the reader still waits, with the channel its read ends
// on. If the reader gives up first, the test fails saying why.
func streamWhileReaderWaits(t *testing.T, r *rig, srv *faultServer, f *fetch.Fetcher, bad int, why string) <-chan error {
	t.Helper()
	n := len(r.o.Manifest.Segments)
	arrived := make(chan int, n)
	f.Observe(func(seg int, _ []overlay.ChunkID, _ bool) { arrived <- seg })
	img, off := r.firstChunk(bad)
	done := make(chan error, 1)
	go func() { done <- f.ReadAt(context.Background(), img, make([]byte, 100), off) }()
	deadline := time.Now().Add(10 * time.Second)
	for f.Waiting() == 0 || srv.requests(bad) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the reader was not waiting on the failing segment after 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	f.Start()
	for got := 0; got < n-1; {
		select {
		case seg := <-arrived:
			if seg == bad {
				t.Fatalf("segment %d arrived despite its fault", seg)
			}
			got++
		case err := <-done:
			t.Fatalf("the reader gave up (%v) with %d of the other %d segments streamed: %s: %+v", err, got, n-1, why, f.Stats())
		}
	}
	return done
}

// With a cache that refuses every write, a chunk read again and again is
// fetched once, from memory after that, and the stream does not download
// the segments over and over: it waits for the cache, trying it on the
// backoff.
func TestCacheFailingFetchesOnce(t *testing.T) {
	r := newRig(t)
	cache := &fullCache{Cache: r.cache, full: true}
	var mu sync.Mutex
	reqs := map[int64]int{}
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		mu.Lock()
		reqs[off]++
		mu.Unlock()
		return b, nil
	}
	requests := func() (total, of int) {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range reqs {
			total += c
		}
		return total, reqs[r.o.Manifest.Segments[1].Offset]
	}
	const backoff, maxBackoff = 20 * time.Millisecond, 200 * time.Millisecond
	f, err := fetch.New(r.src, r.o, r.base, cache, fetch.Options{Timeout: 5 * time.Second, Backoff: backoff, MaxBackoff: maxBackoff, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	img, off := r.firstChunk(1)
	want := r.image(t, img)[off : off+4096]
	for i := range 10 {
		got := make([]byte, 4096)
		if err := f.ReadAt(context.Background(), img, got, off); err != nil {
			t.Fatalf("read %d with the cache full: %v", i, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %d: wrong bytes", i)
		}
	}
	if _, of := requests(); of != 1 {
		t.Fatalf("10 reads of one chunk with the cache full fetched its segment %d times, want 1", of)
	}
	// The stream: a first pass and then one try per backoff period,
	// whose ramp from backoff to maxBackoff takes log2(max/backoff) tries.
	f.Start()
	const window = 2 * time.Second
	<-time.After(window)
	n := len(r.o.Manifest.Segments)
	total, _ := requests()
	if limit := 1 + n + int(window/maxBackoff) + 5; total > limit {
		t.Fatalf("%d segment downloads in %s with the cache full, want at most %d (backoff %s to %s): %+v", total, window, limit, backoff, maxBackoff, f.Stats())
	}
	t.Logf("%d segment downloads in %s with the cache refusing writes", total, window)
	// Once the cache takes writes again, the stream fills it.
	cache.mu.Lock()
	cache.full = false
	cache.mu.Unlock()
	awaitComplete(t, f, 10*time.Second, "not complete 10 s after the cache took writes again")
}

// A stream fetch preempted by a reader is taken up again as soon as the
// reader's fetch is done, before the stream moves on.
func TestPreemptedSegmentResumedFirst(t *testing.T) {
	r := newRig(t)
	segOf := map[int64]int{}
	for i, s := range r.o.Manifest.Segments {
		segOf[s.Offset] = i
	}
	var mu sync.Mutex
	var order []int
	entered := make(chan struct{})
	var once sync.Once
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		mu.Lock()
		order = append(order, segOf[off])
		first := len(order) == 1
		mu.Unlock()
		if first {
			// The stream's first fetch holds until it is preempted.
			once.Do(func() { close(entered) })
			<-ctx.Done()
			return nil, ctx.Err()
		}
		return b, nil
	}
	f := r.fetcher(t, 5*time.Second)
	f.Start()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not start within 5 s")
	}
	const demand = 2
	img, off := r.firstChunk(demand)
	if err := f.ReadAt(context.Background(), img, make([]byte, 100), off); err != nil {
		t.Fatal(err)
	}
	awaitComplete(t, f, 10*time.Second, "not complete")
	mu.Lock()
	defer mu.Unlock()
	want := []int{0, demand, 0}
	for seg := 1; seg < len(r.o.Manifest.Segments); seg++ {
		if seg != demand {
			want = append(want, seg)
		}
	}
	if len(order) != len(want) {
		t.Fatalf("requests in order %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("requests in order %v, want %v: the preempted segment is taken up first", order, want)
		}
	}
	if st := f.Stats(); st.StreamPreemptions != 1 {
		t.Fatalf("%d preemptions, want 1", st.StreamPreemptions)
	}
}

// outageServer serves the rig's overlay, but while down it drops every
// connection, as a link that is gone does.
type outageServer struct {
	*faultServer
	down atomic.Bool
}

// After a link outage the stream finishes within one backoff of the
// source's from the link coming back, however often readers tried during
// it: failures of the link are not held against each segment.
func TestStreamResumesAfterOutage(t *testing.T) {
	r := newRig(t)
	srv := &outageServer{}
	srv.faultServer = newFaultServer(t, r, -1, nil)
	inner := srv.Config.Handler
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if srv.down.Load() {
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}
			return
		}
		inner.ServeHTTP(w, req)
	})
	const (
		backoff = 50 * time.Millisecond
		outage  = 2 * time.Second
		timeout = 200 * time.Millisecond
	)
	srv.down.Store(true)
	f := r.httpFetcher(t, srv.faultServer, fetch.Options{Timeout: timeout, Backoff: backoff, MaxBackoff: time.Minute})
	f.Start()
	// Readers keep asking for one segment through the outage.
	img, off := r.firstChunk(3)
	end := time.Now().Add(outage)
	for caller := uint32(1); time.Now().Before(end); caller++ {
		ctx := fetch.WithCaller(context.Background(), caller)
		if err := f.ReadAt(ctx, img, make([]byte, 100), off); err == nil {
			t.Fatal("a read succeeded during the outage")
		}
	}
	srv.down.Store(false)
	back := time.Now()
	// The source's backoff doubles at most once per period, so its next
	// try is at most the outage's length away, plus one backoff.
	bound := outage + 2*backoff + time.Second
	select {
	case <-f.Complete():
		t.Logf("complete %s after the link came back", time.Since(back).Round(time.Millisecond))
	case <-time.After(bound):
		t.Fatalf("not complete %s after the link came back: %+v", bound, f.Stats())
	}
}

// The repeat window fails at once only the caller whose read timed out:
// another thread reading the same range waits, and gets the bytes once
// the fault passes.
func TestRepeatWindowPerCaller(t *testing.T) {
	r := newRig(t)
	stall := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(stall) }) }
	defer release()
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		select {
		case <-stall:
			return b, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	const timeout = time.Second
	f := r.fetcher(t, timeout)
	img, off := r.firstChunk(0)
	read := func(caller uint32) (time.Duration, error) {
		start := time.Now()
		err := f.ReadAt(fetch.WithCaller(context.Background(), caller), img, make([]byte, 4096), off)
		return time.Since(start), err
	}
	if took, err := read(1); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("first read: %v after %s, want a timeout after %s", err, took, timeout)
	}
	if took, err := read(1); !errors.Is(err, fetch.ErrTimeout) || took > timeout/4 {
		t.Fatalf("the same caller's repeat: %v after %s, want a timeout at once", err, took)
	}
	// Another caller, within the window: it waits, and is served once the
	// fetch can go on.
	done := make(chan error, 1)
	go func() { _, err := read(2); done <- err }()
	deadline := time.Now().Add(timeout / 2)
	for f.Waiting() == 0 {
		select {
		case err := <-done:
			t.Fatalf("another caller's read of the same range: %v at once, want it to wait", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("another caller's read was not waiting")
		}
		time.Sleep(time.Millisecond)
	}
	release()
	if err := <-done; err != nil {
		t.Fatalf("another caller's read of the same range: %v, want the bytes", err)
	}
}

// blockingVerify is the real cache with the first re-verification held
// until released: the seam for a cache slow to read.
type blockingVerify struct {
	fetch.Cache
	release chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (c *blockingVerify) VerifySegment(seg int) (bool, error) {
	first := false
	c.once.Do(func() { first = true })
	if first {
		close(c.entered)
		<-c.release
	}
	return c.Cache.VerifySegment(seg)
}

// A read waiting behind another read's re-verification of a cached
// segment gives up at its deadline like any other wait.
func TestVerifyWaitWithinDeadline(t *testing.T) {
	r := newRig(t)
	f := r.fetcher(t, 5*time.Second)
	f.Start()
	awaitComplete(t, f, 10*time.Second, "not complete")
	f.Close()
	cache := &blockingVerify{Cache: r.cache, release: make(chan struct{}), entered: make(chan struct{})}
	defer close(cache.release)
	const timeout = 500 * time.Millisecond
	f2, err := fetch.New(r.src, r.o, r.base, cache, fetch.Options{Timeout: timeout, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f2.Close)
	img, off := r.firstChunk(0)
	go f2.ReadAt(context.Background(), img, make([]byte, 100), off)
	select {
	case <-cache.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no verification began")
	}
	img, off = r.firstChunk(1)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- f2.ReadAt(context.Background(), img, make([]byte, 100), off) }()
	select {
	case err := <-done:
		if !errors.Is(err, fetch.ErrTimeout) {
			t.Fatalf("read behind a verification: %v, want a timeout", err)
		}
		t.Logf("read behind a verification gave up after %s", time.Since(start).Round(time.Millisecond))
	case <-time.After(timeout + 2*time.Second):
		t.Fatalf("read behind a verification still waiting %s after it began, with a timeout of %s", timeout+2*time.Second, timeout)
	}
}

// Stats counts every wait, past the sample its percentiles are taken from.
func TestWaitsCountedPastTheSample(t *testing.T) {
	r := newRig(t)
	f := r.fetcher(t, time.Second)
	n := fetch.MaxWaits + 10
	f.NoteWaits(n, time.Millisecond)
	if st := f.Stats(); st.Waits != n || st.WaitP50Ms != 1 {
		t.Fatalf("%d waits of 1 ms: stats say %d waits, p50 %g ms", n, st.Waits, st.WaitP50Ms)
	}
}

// blockingWrite is the real cache with the writes of one segment held
// until released: the seam for a cache slow to write.
type blockingWrite struct {
	fetch.Cache
	seg     int
	entered chan struct{}
	release chan struct{}
}

func (c *blockingWrite) WriteSegment(seg int, chunks []store.ChunkData) error {
	if seg == c.seg {
		close(c.entered)
		<-c.release
	}
	return c.Cache.WriteSegment(seg, chunks)
}

// A reader does not preempt a stream fetch whose whole segment is in and
// being cached: there is nothing left on the link to cut.
func TestNoPreemptionOnceArrived(t *testing.T) {
	r := newRig(t)
	cache := &blockingWrite{Cache: r.cache, seg: 0, entered: make(chan struct{}), release: make(chan struct{})}
	f, err := fetch.New(r.src, r.o, r.base, cache, fetch.Options{Timeout: 5 * time.Second, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	f.Start()
	select {
	case <-cache.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not cache segment 0 within 5 s")
	}
	img, off := r.firstChunk(1)
	err = f.ReadAt(context.Background(), img, make([]byte, 100), off)
	close(cache.release)
	if err != nil {
		t.Fatalf("read of segment 1 while segment 0 was being cached: %v", err)
	}
	awaitComplete(t, f, 10*time.Second, "not complete")
	if st := f.Stats(); st.StreamPreemptions != 0 || st.SegmentsStreamed+st.SegmentsDemanded != int64(st.Segments) {
		t.Fatalf("a reader preempted a stream fetch already being cached: %+v", st)
	}
}
