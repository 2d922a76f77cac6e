package fetch

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// The scheduler, in one place.
//
// A segment is in one of these states; f.mu guards them all (f.segs,
// f.flights, f.demanding, the backoffs of the source and the cache, and
// f.mem).
//
//   - absent: not cached, not in flight. The streamer (stream, in overlay
//     order) or a reader (requestLocked, via ensure) starts a flight for it.
//   - unverified: cached by an earlier mount. The first read in this mount
//     that needs it re-checks the cache's copy against its digest
//     (verifyCached): present if it holds, absent (and the marker dropped)
//     if not. The streamer treats it as present.
//   - in flight: f.flights[seg] holds the one flight of it; every reader
//     that needs it waits on that flight (flight.done). A stream flight
//     (demand false) is one attempt (two if the first arrives corrupt). A
//     demand flight, or a stream flight a reader joined (which makes it
//     demand), retries errors that may pass for as long as any reader
//     waits on it (flight.waiters > 0).
//   - preempted: a stream flight cancelled because a demand flight began
//     its first try (preemptLocked; a demand's retries do not preempt, or
//     on a link slower than their pace the stream would never finish a
//     segment). Its request is cut at once, unless its whole body is in;
//     the segment goes back to absent with no failure counted, and the
//     stream takes it up again before moving on. A reader that finds it
//     waits for it to end and asks again.
//   - abandoned: a flight whose last waiting reader gave up (its deadline,
//     or the kernel interrupted it) is cancelled (leaveLocked), so no fetch
//     is left hanging with no one to serve; the next reader starts anew,
//     on a new connection. A stream flight a reader joined and left is
//     not: mid-request it goes back to being the stream's (demand false),
//     so a slow segment is not cut by every reader that times out on it;
//     between retries it is cancelled like the others.
//   - failing: segState.failures > 0. Each failed attempt counts one, and
//     is blamed on one of three things, each with its own backoff that
//     doubles per failure from Options.Backoff to Options.MaxBackoff:
//     the segment (a 4xx other than 408/429, a wrong Content-Range, a
//     segment that arrived corrupt twice: segState.own), the source (an
//     error of the network, a stall, a 5xx, 408 or 429: f.srcFails, which
//     a failure while the source already backs off does not double), or
//     the cache (it cannot store the segment: f.cacheFails). retryAt is
//     the end of that backoff, or later the server's Retry-After
//     (notBefore; a Retry-After holds the stream's requests of every
//     segment until then too, f.srcNotBefore, which no success lifts). The streamer
//     skips the segment until then and comes back for it. Any fetch that
//     succeeds ends the source's backoff and the retry times of the
//     segments it was blamed for: after an outage the stream goes on at
//     once. A cache that takes a segment again does the same for the
//     cache. A reader starts a fetch at once, ignoring the backoff and a
//     Retry-After given for another segment, but not one given for its
//     own, unless the last error was the segment's own
//     (permanent): then, until retryAt, it fails at once with that error.
//   - dead: arrived corrupt maxCorrupt times in this mount. Never fetched
//     again until the overlay is mounted again; reads fail at once with
//     the reason.
//   - present: verified and cached. Final. A segment that verified but
//     could not be cached is handed to the readers waiting on its flight
//     from memory (flight.mem) and counts as failing, so it is fetched
//     again later. It is kept in memory too (f.mem, the most recently used
//     segments up to MemCacheBytes), so that later reads of it are served
//     without fetching it again.
//
// Who wakes whom: a flight's goroutine (run) closes flight.done when it
// ends, waking every reader on it, and pokes f.wake, waking the streamer.
// The streamer starts no segment while a demand flight transfers
// (f.demanding counts demand flights with flight.transfer set), and a
// demand's first try cuts the stream's request, so a new reader does not
// compete with the stream for the link; a retry lets the stream's request
// under way finish. A demand flight that only waits (for a demand slot,
// between retries, or out a Retry-After) does not hold the stream back:
// it drops out of f.demanding and pokes f.wake while it waits, and holds
// it back again when it next transfers. The streamer also stands aside
// while the cache backs off (f.cacheRetryAt), out the server's
// Retry-After (f.srcNotBefore), and while the source backs off
// (f.srcRetryAt) after the stream's own fetch failed for it (f.srcHold):
// every segment would fail the same way. A reader's failing fetch of one
// segment does not hold the stream back: the others may well arrive. A
// backoff that ends early (recoveredLocked) pokes f.wake. Close cancels
// f.ctx: every flight, the streamer and every waiting reader return.
//
// What bounds each wait: a reader waits at most Options.Timeout for all
// the segments of its read (one deadline, which also ends a wait behind
// another read's re-verification of a cached segment; a read by the same
// caller within the range of one that timed out less than repeatWindow
// ago fails at once), then gives up, which cancels flights no one else
// waits on (a joined stream flight mid-request goes back to the stream,
// bounded as a stream flight is). A single request waits at most the
// source's no-progress limit for each byte (HTTPSource.SetNoProgress), so
// a stream flight, one attempt, ends unless bytes keep arriving. A demand flight lives only
// while a reader waits on it. A retry within a flight waits at most
// demandRetry, or the server's Retry-After (at most MaxBackoff). The
// streamer's sleep ends at the earliest retry time of a segment, the
// source or the cache (each at most MaxBackoff away), a flight's end, a
// poke, or Close.

// Cache is where verified chunks and written chunks live; store.Cache is
// the real one. Cached chunks are read at their image offsets.
type Cache interface {
	WriteSegment(seg int, chunks []store.ChunkData) error
	Segments() ([]int, error)
	// VerifySegment re-reads a cached segment's chunks and checks them
	// against the digest recorded when they were cached; a segment that
	// fails is forgotten.
	VerifySegment(seg int) (bool, error)
	ReadAt(img overlay.Image, p []byte, off int64) error
	// WriteCow stores bytes written through the mount; every chunk they
	// touch is covered whole or already written. ReadCow reads written
	// chunks back, a run of them at once.
	WriteCow(img overlay.Image, p []byte, off int64) error
	ReadCow(img overlay.Image, p []byte, off int64) error
	// DiscardCows records whole chunks as zeros, as markers, in one
	// write; Cow then fills them with zeros.
	DiscardCows(ids []overlay.ChunkID) error
	DiscardedChunks() ([]overlay.ChunkID, error)
	CowChunks() ([]overlay.ChunkID, error)
	Sync() error
}

// Options tune a Fetcher.
type Options struct {
	// Timeout bounds every wait for a segment; an expired wait fails the
	// read. Default 30 s.
	Timeout time.Duration
	// MaxDemand bounds demand fetches running at once. Default 8.
	MaxDemand int
	// Backoff is the first delay before the stream tries a failed segment
	// again; it doubles with each failure of that segment up to
	// MaxBackoff. Defaults 50 ms and 2 minutes.
	Backoff, MaxBackoff time.Duration
	Log                 zerolog.Logger
	// Parent supplies the chunks a layered overlay takes from its parent:
	// the parent's own fetcher, made with Original set. A layered overlay
	// needs one.
	Parent *Fetcher
	// Original serves the overlay's own bytes only: what earlier mounts
	// wrote into its cache is not read. A parent's fetcher is made so.
	Original bool
	// Location names the overlay's source in Stats, fit to show.
	Location string
}

// Observer is told of every segment fetched, verified and cached, with the
// chunks it carried.
type Observer func(seg int, chunks []overlay.ChunkID, demand bool)

// MemCacheBytes bounds the segments kept in memory because the cache could
// not store them (at least one is kept, whatever its size).
const MemCacheBytes = 8 << 20

// Errors a read can fail with. The file system turns all of them into EIO.
var (
	ErrTimeout = errors.New("timed out waiting for the segment")
	ErrClosed  = errors.New("the mount is shutting down")
	// ErrFailing: the segment's last fetch failed in a way that will not
	// pass by asking again at once; the error says why and when it is
	// tried again.
	ErrFailing = errors.New("the segment cannot be fetched now")
)

// maxCorrupt is how many times a segment may arrive corrupt in one mount:
// once may be a fault on the way, and is fetched again at once; twice is a
// failure, tried again after a backoff; the third time the overlay on the
// server is taken to be corrupt, and the segment is not fetched again.
const maxCorrupt = 3

// demandRetry bounds the pause between tries of a flight a reader waits on.
const demandRetry = time.Second

// errAbandoned ends a flight that every waiting reader gave up on.
var errAbandoned = errors.New("every reader waiting on the fetch gave up")

// Fetcher supplies the chunks of one mounted overlay. A streamer pulls the
// segments in overlay order; a read of a chunk whose segment has not
// arrived posts a demand that runs before the stream, joins a fetch of that
// segment already in flight, and waits no longer than the timeout.
type Fetcher struct {
	src   Source
	o     *overlay.Overlay
	base  *overlay.Base
	cache Cache
	opt   Options

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	demand chan struct{} // demand fetch slots
	wake   chan struct{} // wakes the streamer when a flight ends

	mu        sync.Mutex
	segs      []segState
	nPresent  int
	flights   map[int]*flight
	demanding int // demand flights transferring
	complete  chan struct{}
	completed bool     // complete is closed
	gaveUp    []giveUp // reads that timed out within the last repeatWindow

	// The backoffs of the source and the cache (see the states above).
	srcFails, cacheFails     int
	srcRetryAt, cacheRetryAt time.Time
	srcHold                  bool      // the stream's own fetch failed for the source: it waits out srcRetryAt
	srcNotBefore             time.Time // the server's last Retry-After: no request of any segment before it

	// Segments the cache could not store, by segment, and their use:
	// least recently used first.
	mem      map[int]map[overlay.ChunkID][]byte
	memOrder []int
	memBytes int64

	verifying chan struct{} // one cache verification at a time

	// segOf maps each data or self chunk to the segment that carries its
	// bytes (-1 for zero and base chunks); selfOf lists, per data chunk,
	// the chunks that repeat it, so they are cached with it.
	segOf  [2][]int32
	selfOf map[overlay.ChunkID][]overlay.ChunkID

	// cow is each chunk's copy-on-write state (cowNone, cowData or
	// cowZero), under cowMu; held counts, per image, the chunks that hold
	// bytes (data, self or base chunks not written over, and written
	// chunks not discarded), and discarded the chunks in cowZero. Both
	// change only with cow, under cowMu held for writing.
	cowMu     sync.RWMutex
	cow       [2][]cowState
	held      [2]int64
	discarded int
	anyCow    atomic.Bool

	st       counters
	observer atomic.Pointer[Observer]

	cachedAtOpen int           // segments present when the fetcher was made
	allDone      chan struct{} // complete, and the parent's Complete
}

// segState is what the scheduler knows of one segment (see the states at
// the top of this file).
type segState struct {
	present   bool
	verified  bool // present and known good in this mount
	dead      bool
	failures  int   // every failure, whatever it is blamed on
	own       int   // failures blamed on the segment itself
	corrupt   int   // downloads that failed verification, this mount
	lastErr   error // of the last failure
	blame     blame // of the last failure
	permanent bool  // lastErr will not pass by asking again at once
	retryAt   time.Time
	notBefore time.Time // the server's Retry-After: no request before it
}

// blame is what a failure is put down to; each has its own backoff.
type blame int

const (
	blameSegment blame = iota // the segment's own: 4xx, wrong range, corrupt
	blameSource               // the network or the server: may pass for every segment at once
	blameCache                // the cache could not store it
)

// nextTry is when the stream may try the segment again.
func (st *segState) nextTry() time.Time { return later(st.notBefore, st.retryAt) }

// Observe sets the function told of every fetched segment.
func (f *Fetcher) Observe(fn Observer) { f.observer.Store(&fn) }

// flight is one fetch of one segment; everyone who needs the segment waits
// on it.
type flight struct {
	seg       int
	done      chan struct{}
	err       error
	mem       map[overlay.ChunkID][]byte // the chunks, when the cache could not keep them
	demand    bool                       // a reader waits on it, or it began as a demand: never preempt
	cancelled bool                       // preempted or abandoned: waited out, never joined
	preempted bool                       // cancelled for a demand: the stream takes it up again first
	stream    bool                       // began as the stream's flight
	transfer  bool                       // a request is under way, not a wait
	arrived   bool                       // its whole body is in: nothing left to cut
	movedOn   bool                       // a stream attempt failed with no reader on it: a reader asks again
	waiters   int                        // readers waiting on it
	cancel    context.CancelCauseFunc
}

// giveUp is a read that timed out.
type giveUp struct {
	rk readKey
	at time.Time
}

// readKey is the part of an image a read asked for, and who asked.
type readKey struct {
	caller   uint32 // the thread (WithCaller)
	img      overlay.Image
	off, end int64
}

// repeatWindow is how long after a read times out that a read by the same
// caller (the same thread: see WithCaller) within the same range fails at
// once. The kernel answers a failed read-ahead by reading the one page the
// caller wants, at once: that is the same read to the caller, and must not
// wait a second timeout. Other callers, and other reads of the same
// segment, wait as usual.
const repeatWindow = time.Second

// New prepares a fetcher. Segments already in the cache count as present;
// each is re-verified the first time a read needs it.
func New(src Source, o *overlay.Overlay, base *overlay.Base, cache Cache, opt Options) (*Fetcher, error) {
	if opt.Timeout <= 0 {
		opt.Timeout = 30 * time.Second
	}
	if opt.MaxDemand <= 0 {
		opt.MaxDemand = 8
	}
	if opt.Backoff <= 0 {
		opt.Backoff = 50 * time.Millisecond
	}
	if opt.MaxBackoff <= 0 {
		opt.MaxBackoff = 2 * time.Minute
	}
	if err := o.CheckBase(base); err != nil {
		return nil, err
	}
	if o.Header.Layered() {
		if opt.Parent == nil {
			return nil, fmt.Errorf("overlay %s is layered on overlay %s (%s), which is not open", o.ID.Short(), o.Manifest.Parent.ID.Short(), o.Manifest.Parent.Location)
		}
		if err := o.CheckParent(opt.Parent.o); err != nil {
			return nil, err
		}
	}
	f := &Fetcher{
		src: src, o: o, base: base, cache: cache, opt: opt,
		demand:   make(chan struct{}, opt.MaxDemand),
		wake:     make(chan struct{}, 1),
		segs:     make([]segState, len(o.Manifest.Segments)),
		flights:  map[int]*flight{},
		selfOf:   map[overlay.ChunkID][]overlay.ChunkID{},
		complete: make(chan struct{}),
		mem:      map[int]map[overlay.ChunkID][]byte{},

		verifying: make(chan struct{}, 1),
	}
	m := o.Manifest
	for _, img := range overlay.Images {
		f.cow[img] = make([]cowState, len(m.Refs[img]))
		f.segOf[img] = make([]int32, len(m.Refs[img]))
		for i, r := range m.Refs[img] {
			seg := int32(-1)
			switch r.Kind {
			case overlay.Data:
				seg = int32(m.SegmentOf(int(r.Index)))
			case overlay.Self:
				t := overlay.ChunkID{Image: r.Image, Index: r.Index}
				seg = int32(m.SegmentOf(int(m.Refs[t.Image][t.Index].Index)))
				f.selfOf[t] = append(f.selfOf[t], overlay.ChunkID{Image: img, Index: uint32(i)})
			}
			f.segOf[img][i] = seg
		}
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	segs, err := cache.Segments()
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	for _, s := range segs {
		if s < len(f.segs) && !f.segs[s].present {
			f.segs[s].present = true
			f.nPresent++
		}
	}
	f.cachedAtOpen = f.nPresent
	var cow, zero []overlay.ChunkID
	if !opt.Original {
		if cow, err = cache.CowChunks(); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
		if zero, err = cache.DiscardedChunks(); err != nil {
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	for _, c := range cow {
		if int(c.Index) < len(f.cow[c.Image]) {
			f.cow[c.Image][c.Index] = cowData
			f.anyCow.Store(true)
		}
	}
	for _, c := range zero {
		if int(c.Index) < len(f.cow[c.Image]) {
			f.cow[c.Image][c.Index] = cowZero
		}
	}
	for _, img := range overlay.Images {
		for i, st := range f.cow[img] {
			switch {
			case st == cowZero:
				f.discarded++
			case st == cowData || m.Refs[img][i].Kind != overlay.Zero:
				f.held[img]++
			}
		}
	}
	f.st.init(o)
	f.closeCompleteLocked()
	f.allDone = f.complete
	if p := opt.Parent; p != nil {
		f.allDone = make(chan struct{})
		go func() {
			for _, c := range []<-chan struct{}{f.complete, p.Complete()} {
				select {
				case <-c:
				case <-f.ctx.Done():
					return
				}
			}
			close(f.allDone)
		}()
	}
	return f, nil
}

// Overlay returns the overlay being served.
func (f *Fetcher) Overlay() *overlay.Overlay { return f.o }

// Start launches the streamer.
func (f *Fetcher) Start() {
	f.st.streaming.Store(true)
	f.wg.Add(1)
	go f.stream()
}

// Close stops the streamer and every fetch, wakes every waiter with
// ErrClosed, and waits for them to finish.
func (f *Fetcher) Close() {
	// Cancel under the lock: no flight can start after it (see
	// requestLocked), so Wait does not race a new Add.
	f.mu.Lock()
	f.cancel()
	f.mu.Unlock()
	f.wg.Wait()
}

// Complete is closed when every segment is present, the parent's too. A cached segment
// found bad on re-verification is fetched again when read, but Complete
// stays closed.
func (f *Fetcher) Complete() <-chan struct{} { return f.allDone }

// stream walks the segments in order, skipping those present, in flight,
// failed for good or backing off, and fetches one at a time. It stands
// aside while a demand flight transfers, so the stream's bytes in flight
// never exceed one segment and never compete with a waiting reader. A
// segment whose fetch was preempted is taken up again before the next.
// It ends when every segment is present or failed for good.
func (f *Fetcher) stream() {
	defer f.wg.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	next := 0
	for {
		f.mu.Lock()
		if f.ctx.Err() != nil {
			f.mu.Unlock()
			return
		}
		seg, sleep, finished := f.pickLocked(next)
		if finished {
			f.mu.Unlock()
			return
		}
		if f.demanding > 0 || seg < 0 {
			demanding := f.demanding > 0
			f.mu.Unlock()
			var retry <-chan time.Time
			if !demanding && sleep > 0 {
				timer.Reset(sleep)
				retry = timer.C
			}
			select {
			case <-f.wake:
			case <-retry:
			case <-f.ctx.Done():
				return
			}
			timer.Stop()
			continue
		}
		fl := f.startLocked(seg, false)
		f.mu.Unlock()
		select {
		case <-fl.done:
		case <-f.ctx.Done():
			return
		}
		next = seg + 1
		if fl.preempted {
			next = seg
		}
	}
}

// pickLocked returns the first segment from next on (wrapping around) that
// the stream may fetch now, or -1 and how long until a backing-off segment,
// the source or the cache may be tried again (0 if none is backing off:
// only a flight ending can give the stream work). finished is true when
// nothing is left to fetch.
func (f *Fetcher) pickLocked(next int) (seg int, sleep time.Duration, finished bool) {
	now := time.Now()
	hold := later(f.cacheRetryAt, f.srcNotBefore)
	if f.srcHold {
		hold = later(hold, f.srcRetryAt)
	}
	var soonest time.Time
	finished = true
	n := len(f.segs)
	for i := range n {
		s := (next + i) % n
		st := &f.segs[s]
		if st.present || st.dead {
			continue
		}
		finished = false
		if f.flights[s] != nil {
			continue
		}
		at := st.nextTry()
		if at.After(now) {
			if soonest.IsZero() || at.Before(soonest) {
				soonest = at
			}
			continue
		}
		if hold.After(now) {
			return -1, hold.Sub(now), false
		}
		return s, 0, false
	}
	if !soonest.IsZero() {
		sleep = max(soonest.Sub(now), time.Millisecond)
	}
	return -1, sleep, finished
}

// startLocked starts a flight for segment seg. A demand flight preempts the
// stream's flight when it begins its first try (fetch).
func (f *Fetcher) startLocked(seg int, demand bool) *flight {
	ctx, cancel := context.WithCancelCause(f.ctx)
	fl := &flight{seg: seg, done: make(chan struct{}), demand: demand, stream: !demand, cancel: cancel}
	f.flights[seg] = fl
	f.wg.Add(1)
	go f.run(ctx, fl, demand)
	return fl
}

// preemptLocked cancels the stream's fetch, unless it is keep, the flight a
// reader is about to wait on, or its body is already in.
func (f *Fetcher) preemptLocked(keep *flight) {
	for _, fl := range f.flights {
		if fl != keep && !fl.demand && !fl.cancelled && !fl.arrived {
			fl.cancelled, fl.preempted = true, true
			fl.cancel(errPreempted)
			f.st.preempted.Add(1)
		}
	}
}

// errPreempted ends a stream flight that a demand displaced.
var errPreempted = errors.New("preempted by a demand read")

// run performs a flight. A flight started by a demand takes one of the
// demand slots; a stream flight never needs one.
func (f *Fetcher) run(ctx context.Context, fl *flight, demand bool) {
	defer f.wg.Done()
	defer fl.cancel(nil)
	if demand {
		select {
		case f.demand <- struct{}{}:
			defer func() { <-f.demand }()
		case <-ctx.Done():
		}
	}
	mem, err := f.fetch(ctx, fl)
	f.mu.Lock()
	delete(f.flights, fl.seg)
	if err == nil && mem == nil {
		f.markPresentLocked(fl.seg)
	}
	f.transferLocked(fl, false)
	fl.err, fl.mem = err, mem
	close(fl.done)
	f.pokeLocked()
	f.mu.Unlock()
}

// transferLocked notes that fl starts or stops a request. A demand flight
// holds the stream back only while it transfers.
func (f *Fetcher) transferLocked(fl *flight, on bool) {
	if fl.transfer == on {
		return
	}
	fl.transfer = on
	if !fl.demand {
		return
	}
	if on {
		f.demanding++
	} else {
		f.demanding--
		f.pokeLocked()
	}
}

// memPutLocked keeps the chunks of a segment the cache could not store,
// n bytes, dropping the least recently used ones past MemCacheBytes.
func (f *Fetcher) memPutLocked(seg int, m map[overlay.ChunkID][]byte, n int64) {
	f.memDropLocked(seg)
	f.mem[seg] = m
	f.memOrder = append(f.memOrder, seg)
	f.memBytes += n
	for f.memBytes > MemCacheBytes && len(f.memOrder) > 1 {
		f.memDropLocked(f.memOrder[0])
	}
}

// memGetLocked returns the chunks of seg kept in memory, nil if none, and
// makes it the most recently used.
func (f *Fetcher) memGetLocked(seg int) map[overlay.ChunkID][]byte {
	m := f.mem[seg]
	if m != nil {
		f.memOrder = append(slices.DeleteFunc(f.memOrder, func(s int) bool { return s == seg }), seg)
	}
	return m
}

// memDropLocked forgets the chunks of seg kept in memory.
func (f *Fetcher) memDropLocked(seg int) {
	m := f.mem[seg]
	if m == nil {
		return
	}
	for _, b := range m {
		f.memBytes -= int64(len(b))
	}
	delete(f.mem, seg)
	f.memOrder = slices.DeleteFunc(f.memOrder, func(s int) bool { return s == seg })
}

// pokeLocked wakes the streamer.
func (f *Fetcher) pokeLocked() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

func (f *Fetcher) markPresentLocked(seg int) {
	st := &f.segs[seg]
	if st.present {
		return
	}
	*st = segState{present: true, verified: true, corrupt: st.corrupt}
	f.memDropLocked(seg)
	f.nPresent++
	f.closeCompleteLocked()
}

// closeCompleteLocked closes f.complete once every segment is present, the
// first time.
func (f *Fetcher) closeCompleteLocked() {
	if f.nPresent == len(f.segs) && !f.completed {
		f.completed = true
		close(f.complete)
	}
}

// failLocked counts a failure of segment seg, blames it on the segment,
// the source or the cache, and sets when the stream may try it again: at
// the end of the backoff of what it is blamed on.
func (f *Fetcher) failLocked(seg int, err error, b blame, after time.Duration) {
	st := &f.segs[seg]
	st.failures++
	st.lastErr, st.blame, st.permanent = err, b, b == blameSegment
	now := time.Now()
	switch b {
	case blameSegment:
		st.own++
		st.retryAt = now.Add(f.backoff(st.own))
	case blameSource:
		// Failures while the source already backs off, of other
		// segments or of a reader's retries, are the same outage: they
		// do not double it again.
		if !now.Before(f.srcRetryAt) {
			f.srcFails++
			f.srcRetryAt = now.Add(f.backoff(f.srcFails))
		}
		st.retryAt = f.srcRetryAt
	case blameCache:
		if !now.Before(f.cacheRetryAt) {
			f.cacheFails++
			f.cacheRetryAt = now.Add(f.backoff(f.cacheFails))
		}
		st.retryAt = f.cacheRetryAt
	}
	if after > 0 {
		st.notBefore = now.Add(min(after, f.opt.MaxBackoff))
		// The server asked for quiet, not just about this segment. A
		// fetch that succeeds later does not lift it (recoveredLocked):
		// its request went out before the server asked.
		if b == blameSource && st.notBefore.After(f.srcNotBefore) {
			f.srcNotBefore = st.notBefore
		}
	}
}

// notBeforeLocked is when a request of segment seg may go out: not before
// the segment's Retry-After, and for the stream not before the source's.
// A reader's request waits only for its own segment's: a VM's read must
// not fail because the server asked the background stream for quiet.
func (f *Fetcher) notBeforeLocked(seg int, demand bool) time.Time {
	if demand {
		return f.segs[seg].notBefore
	}
	return later(f.segs[seg].notBefore, f.srcNotBefore)
}

// later is the later of two times.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// backoff is the delay after the nth failure in a row.
func (f *Fetcher) backoff(n int) time.Duration {
	d := f.opt.Backoff
	for i := 1; i < n && d < f.opt.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, f.opt.MaxBackoff)
}

// recoveredLocked ends the backoff of the source or the cache after it
// served a segment, and the retry times of the segments whose last
// failure was blamed on it.
func (f *Fetcher) recoveredLocked(b blame) {
	fails, at := &f.srcFails, &f.srcRetryAt
	if b == blameCache {
		fails, at = &f.cacheFails, &f.cacheRetryAt
	}
	if *fails == 0 {
		return
	}
	*fails, *at = 0, time.Time{}
	if b == blameSource {
		f.srcHold = false
	}
	for i := range f.segs {
		if st := &f.segs[i]; !st.present && st.failures > 0 && st.blame == b {
			st.retryAt = time.Time{}
		}
	}
	f.pokeLocked()
}

// endCause says why a flight's context ended, in the words a reader
// should see.
func (f *Fetcher) endCause(ctx context.Context) error {
	if f.ctx.Err() != nil {
		return ErrClosed
	}
	return context.Cause(ctx)
}

// fetch gets, verifies and caches one segment. It returns the chunks
// themselves when the cache could not keep them. A stream flight makes
// one attempt; a flight readers wait on tries again after errors that may
// pass, until they give up. A segment that arrives corrupt is fetched again
// at once, once.
func (f *Fetcher) fetch(ctx context.Context, fl *flight) (map[overlay.ChunkID][]byte, error) {
	seg := fl.seg
	s := f.o.Manifest.Segments[seg]
	for try := 0; ; try++ {
		f.mu.Lock()
		wait := time.Until(f.notBeforeLocked(seg, fl.demand))
		f.mu.Unlock()
		if !sleep(ctx, wait) {
			return nil, f.endCause(ctx)
		}
		f.mu.Lock()
		f.transferLocked(fl, true)
		// Only a demand's first try preempts the stream: its retries
		// come every demandRetry or sooner, and would cut the stream's
		// request over and over on a link slower than that.
		if try == 0 && fl.demand {
			f.preemptLocked(fl)
		}
		f.mu.Unlock()
		stored, err := f.src.ReadRange(ctx, s.Offset, int64(s.Stored))
		if err == nil {
			f.mu.Lock()
			fl.arrived = true
			f.recoveredLocked(blameSource)
			f.mu.Unlock()
			f.st.bytesFetched.Add(int64(len(stored)))
			var raw []byte
			if raw, err = overlay.DecodeSegment(seg, s, stored); err == nil {
				return f.keep(seg, s, raw, fl)
			}
			f.st.corrupt.Add(1)
			f.mu.Lock()
			fl.arrived = false
			st := &f.segs[seg]
			st.corrupt++
			n := st.corrupt
			if n >= 2 {
				if n >= maxCorrupt {
					st.dead = true
					err = fmt.Errorf("%w: it arrived corrupt %d times and is not fetched again until the overlay is mounted again (last: %w)", ErrFailing, n, err)
				}
				f.failLocked(seg, err, blameSegment, 0)
			}
			f.mu.Unlock()
			f.opt.Log.Error().Err(err).Int("segment", seg).Int("downloads_corrupt", n).Msg("segment failed verification")
			if n < 2 {
				continue
			}
			f.st.failed.Add(1)
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, f.endCause(ctx)
		}
		f.st.errors.Add(1)
		permanent := Permanent(err)
		b := blameSource
		if permanent {
			b = blameSegment
		}
		f.mu.Lock()
		f.failLocked(seg, err, b, retryAfter(err))
		f.transferLocked(fl, false)
		demand := fl.waiters > 0
		if !fl.demand && !permanent {
			f.srcHold = true
		}
		fl.movedOn = !permanent && !demand
		pause := min(time.Until(f.segs[seg].retryAt), demandRetry)
		f.mu.Unlock()
		if permanent {
			f.st.failed.Add(1)
			f.opt.Log.Error().Err(err).Int("segment", seg).Str("source", f.src.String()).Msg("fetch failed")
			return nil, err
		}
		if !demand {
			f.opt.Log.Warn().Err(err).Int("segment", seg).Str("source", f.src.String()).Msg("stream: fetch failed; moving on")
			return nil, err
		}
		f.opt.Log.Warn().Err(err).Int("segment", seg).Str("source", f.src.String()).Msg("fetch failed; retrying")
		if !sleep(ctx, pause) {
			return nil, f.endCause(ctx)
		}
	}
}

// sleep waits for d, or less if ctx ends first; false if it did.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// keep caches a verified segment's chunks, and the chunks that repeat
// them, at their offsets. When the cache cannot take them, it returns them
// for the waiting readers, keeps them in memory for later ones, and counts
// a failure, so the segment is fetched again once the cache takes
// segments again.
func (f *Fetcher) keep(seg int, s overlay.Segment, raw []byte, fl *flight) (map[overlay.ChunkID][]byte, error) {
	ids := f.o.Manifest.Order[s.First : s.First+s.Count]
	chunks := make([]store.ChunkData, 0, len(ids))
	off := int64(0)
	for _, id := range ids {
		n := f.o.Header.ChunkLen(id)
		data := raw[off : off+n]
		off += n
		chunks = append(chunks, store.ChunkData{ID: id, Data: data})
		for _, rep := range f.selfOf[id] {
			// A repeat may be longer than a short last chunk it repeats:
			// the rest is zero.
			b := make([]byte, f.o.Header.ChunkLen(rep))
			copy(b, data)
			chunks = append(chunks, store.ChunkData{ID: rep, Data: b})
		}
	}
	if err := f.cache.WriteSegment(seg, chunks); err != nil {
		err = fmt.Errorf("segment %d: cache: %w", seg, err)
		f.st.uncached.Add(1)
		mem := make(map[overlay.ChunkID][]byte, len(chunks))
		n := int64(0)
		for _, c := range chunks {
			mem[c.ID] = c.Data
			n += int64(len(c.Data))
		}
		f.mu.Lock()
		if f.cacheFails == 0 {
			f.opt.Log.Error().Err(err).Msg("the cache cannot store fetched segments; serving them from memory and fetching them again later (free space in the state dir, or make it writable)")
		}
		f.failLocked(seg, err, blameCache, 0)
		f.memPutLocked(seg, mem, n)
		f.mu.Unlock()
		return mem, nil
	}
	f.mu.Lock()
	if f.cacheFails > 0 {
		f.opt.Log.Info().Int("segment", seg).Msg("the cache stores fetched segments again")
	}
	f.recoveredLocked(blameCache)
	demand := fl.demand
	f.mu.Unlock()
	for _, img := range overlay.Images {
		f.st.fetched[img].Add(int64(f.st.perSeg[seg][img]))
	}
	if demand {
		f.st.demandSegments.Add(1)
	} else {
		f.st.streamSegments.Add(1)
	}
	if fn := f.observer.Load(); fn != nil {
		(*fn)(seg, ids, demand)
	}
	return nil, nil
}

// requestLocked makes sure a fetch of segment seg is under way, for a
// reader about to wait on it, and returns that flight (nil if the segment
// is present). A segment failed for good, or failing with a permanent
// error until its retry time, fails at once.
func (f *Fetcher) requestLocked(seg int) (*flight, error) {
	st := &f.segs[seg]
	if st.present {
		return nil, nil
	}
	if f.ctx.Err() != nil {
		return nil, ErrClosed
	}
	fl := f.flights[seg]
	switch {
	case fl != nil && fl.cancelled:
		// Being cancelled: the caller waits for it to end, then asks again.
	case fl != nil && !fl.demand:
		fl.demand = true
		if fl.transfer {
			f.demanding++
		}
		f.st.demandJoins.Add(1)
	case fl != nil:
		f.st.demandJoins.Add(1)
	case st.dead:
		return nil, fmt.Errorf("segment %d: %w", seg, st.lastErr)
	case st.permanent && time.Now().Before(st.retryAt):
		return nil, fmt.Errorf("segment %d: %w: it failed %d times, next try in %s (last error: %v)",
			seg, ErrFailing, st.failures, time.Until(st.retryAt).Round(time.Millisecond), st.lastErr)
	default:
		fl = f.startLocked(seg, true)
		f.st.demandFetches.Add(1)
	}
	return fl, nil
}

// leaveLocked takes a reader that stops waiting off the flights it waited
// on. A flight left with no reader is cancelled (abandoned), unless it is
// the stream's own, mid-request: that one goes back to the stream, so a
// reader that gives up does not throw the stream's partial download away.
func (f *Fetcher) leaveLocked(fls []*flight) {
	for _, fl := range fls {
		select {
		case <-fl.done:
			continue
		default:
		}
		if fl.cancelled {
			continue
		}
		if fl.waiters--; fl.waiters > 0 {
			continue
		}
		if fl.stream && fl.transfer {
			fl.demand = false
			f.demanding--
			f.pokeLocked()
		} else {
			fl.cancelled = true
			fl.cancel(errAbandoned)
			f.st.abandoned.Add(1)
		}
	}
}

// verifyCached re-checks, once per mount, the cache's copy of each of segs
// that an earlier mount cached; a bad copy makes the segment absent, so it
// is fetched again. A wait for another verification ends with the read's
// deadline (expired), ctx or Close.
func (f *Fetcher) verifyCached(ctx context.Context, expired <-chan time.Time, segs []int) error {
	unverified := func(seg int) bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.segs[seg].present && !f.segs[seg].verified
	}
	for _, seg := range segs {
		if !unverified(seg) {
			continue
		}
		select {
		case f.verifying <- struct{}{}:
		case <-expired:
			f.st.timeouts.Add(1)
			return fmt.Errorf("segment %d: %w after %s, waiting to re-verify its cached copy", seg, ErrTimeout, f.opt.Timeout)
		case <-ctx.Done():
			return ctx.Err()
		case <-f.ctx.Done():
			return ErrClosed
		}
		if unverified(seg) {
			ok, err := f.cache.VerifySegment(seg)
			if err != nil {
				<-f.verifying
				return fmt.Errorf("segment %d: verifying the cache: %w", seg, err)
			}
			f.mu.Lock()
			st := &f.segs[seg]
			st.verified = true
			if !ok {
				st.present, st.verified = false, false
				f.nPresent--
				f.st.cacheBad.Add(1)
				f.opt.Log.Warn().Int("segment", seg).Msg("cached segment does not match its digest; fetching it again")
			}
			f.mu.Unlock()
		}
		<-f.verifying
	}
	return nil
}

// ensure returns once every segment in segs is present, or served from
// memory (returned, by segment), or with an error when a fetch fails, the
// wait outlasts the timeout, a read of the same range timed out less than
// repeatWindow ago, or the fetcher closes. All the fetches are requested
// before any is waited on, and one deadline covers them all.
func (f *Fetcher) ensure(ctx context.Context, rk readKey, segs ...int) (map[int]map[overlay.ChunkID][]byte, error) {
	deadline := time.NewTimer(f.opt.Timeout)
	defer deadline.Stop()
	if err := f.verifyCached(ctx, deadline.C, segs); err != nil {
		return nil, err
	}
	start := time.Now()
	waited := false
	defer func() {
		if waited {
			f.st.endWait(time.Since(start))
		}
	}()
	var mem map[int]map[overlay.ChunkID][]byte
	for {
		f.mu.Lock()
		missing := false
		for _, seg := range segs {
			if mem[seg] == nil && !f.segs[seg].present {
				if m := f.memGetLocked(seg); m != nil {
					if mem == nil {
						mem = map[int]map[overlay.ChunkID][]byte{}
					}
					mem[seg] = m
				}
			}
			missing = missing || mem[seg] == nil && !f.segs[seg].present
		}
		if !missing {
			f.mu.Unlock()
			return mem, nil
		}
		if err := f.repeatLocked(rk); err != nil {
			f.mu.Unlock()
			return nil, err
		}
		var wait []*flight
		for _, seg := range segs {
			if mem[seg] != nil {
				continue
			}
			fl, err := f.requestLocked(seg)
			if err != nil {
				f.leaveLocked(wait)
				f.mu.Unlock()
				return nil, err
			}
			if fl == nil {
				continue
			}
			if !fl.cancelled {
				fl.waiters++
			}
			wait = append(wait, fl)
		}
		f.mu.Unlock()
		if len(wait) == 0 {
			return mem, nil
		}
		if !waited {
			waited = true
			f.st.beginWait()
		}
		for i, fl := range wait {
			select {
			case <-fl.done:
				if fl.err != nil && !fl.cancelled && !fl.movedOn {
					f.mu.Lock()
					f.leaveLocked(wait[i+1:])
					f.mu.Unlock()
					return nil, fmt.Errorf("segment %d: %w", fl.seg, fl.err)
				}
				if fl.mem != nil {
					if mem == nil {
						mem = map[int]map[overlay.ChunkID][]byte{}
					}
					mem[fl.seg] = fl.mem
				}
			case <-deadline.C:
				f.st.timeouts.Add(1)
				f.mu.Lock()
				f.leaveLocked(wait[i:])
				f.gaveUp = append(f.gaveUp, giveUp{rk, time.Now()})
				var last error
				if st := f.segs[fl.seg]; st.lastErr != nil {
					last = st.lastErr
				}
				f.mu.Unlock()
				if last != nil {
					return nil, fmt.Errorf("segment %d: %w after %s (last error: %v)", fl.seg, ErrTimeout, f.opt.Timeout, last)
				}
				return nil, fmt.Errorf("segment %d: %w after %s", fl.seg, ErrTimeout, f.opt.Timeout)
			case <-ctx.Done():
				f.mu.Lock()
				f.leaveLocked(wait[i:])
				f.mu.Unlock()
				return nil, ctx.Err()
			case <-f.ctx.Done():
				return nil, ErrClosed
			}
		}
	}
}

// repeatLocked fails a read within the range of a read by the same caller
// that timed out less than repeatWindow (or the timeout, if shorter) ago,
// and forgets older timeouts.
func (f *Fetcher) repeatLocked(rk readKey) error {
	window := min(f.opt.Timeout, repeatWindow)
	kept := f.gaveUp[:0]
	var hit *giveUp
	for _, g := range f.gaveUp {
		if time.Since(g.at) >= window {
			continue
		}
		kept = append(kept, g)
		if g.rk.caller == rk.caller && g.rk.img == rk.img && g.rk.off <= rk.off && rk.end <= g.rk.end {
			hit = &g
		}
	}
	f.gaveUp = kept
	if hit != nil {
		return fmt.Errorf("%s bytes %d-%d: %w: the same read timed out %s ago", rk.img, rk.off, rk.end-1, ErrTimeout, time.Since(hit.at).Round(time.Millisecond))
	}
	return nil
}

// counters are the fetcher's running totals.
type counters struct {
	bytesFetched, corrupt, errors, failed, timeouts atomic.Int64
	demandFetches, demandJoins, preempted           atomic.Int64
	abandoned, uncached, cacheBad                   atomic.Int64
	demandSegments, streamSegments                  atomic.Int64
	fetched                                         [2]atomic.Int64 // chunks, per image
	streaming                                       atomic.Bool     // Start was called

	mu      sync.Mutex
	waits   []time.Duration // a sample, of at most maxWaits
	count   int             // every wait
	total   time.Duration
	waiting int       // readers waiting now
	since   time.Time // when waiting last rose from 0
	stalled time.Duration

	// per image: chunks that need no network, and per segment the chunks
	// of each image that it supplies
	static [2]int
	perSeg [][2]int
	base   [2]int
	parent [2]int
}

const maxWaits = 1 << 16

// beginWait notes that a reader started waiting.
func (c *counters) beginWait() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.waiting == 0 {
		c.since = time.Now()
	}
	c.waiting++
}

// endWait notes that a reader waited d and stopped.
func (c *counters) endWait(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.waiting--; c.waiting == 0 {
		c.stalled += time.Since(c.since)
	}
	c.total += d
	c.count++
	if len(c.waits) < maxWaits {
		c.waits = append(c.waits, d)
	} else {
		c.waits[int(c.total)%maxWaits] = d
	}
}

func (c *counters) init(o *overlay.Overlay) {
	m := o.Manifest
	c.perSeg = make([][2]int, len(m.Segments))
	for _, img := range overlay.Images {
		for _, r := range m.Refs[img] {
			switch r.Kind {
			case overlay.Zero:
				c.static[img]++
			case overlay.BaseDisk, overlay.BaseMemory:
				c.static[img]++
				c.base[img]++
			case overlay.ParentDisk, overlay.ParentMemory:
				c.static[img]++
				c.parent[img]++
			case overlay.Self:
				t := m.Refs[r.Image][r.Index]
				c.perSeg[m.SegmentOf(int(t.Index))][img]++
			case overlay.Data:
				c.perSeg[m.SegmentOf(int(r.Index))][img]++
			}
		}
	}
}

// ImageStats counts one image's chunks.
type ImageStats struct {
	Total      int `json:"total"`
	Present    int `json:"present"`
	FromBase   int `json:"from_base"`
	FromParent int `json:"from_parent"` // counted in Present: the parent's stats say how far it got
	Fetched    int `json:"fetched"`
	Modified   int `json:"modified"`
}

// SegmentFailure is a segment not present whose fetches have failed.
type SegmentFailure struct {
	Segment   int    `json:"segment"`
	Failures  int    `json:"failures"`
	LastError string `json:"last_error"`
	// RetryInS is how long until the stream tries it again; -1 if it is
	// not tried again in this mount.
	RetryInS float64 `json:"retry_in_s"`
}

// Stats is a snapshot of a fetcher, as the mount's stats file shows it.
type Stats struct {
	Disk              ImageStats `json:"disk"`
	Memory            ImageStats `json:"memory"`
	Segments          int        `json:"segments"`
	SegmentsPresent   int        `json:"segments_present"`
	SegmentsStreamed  int64      `json:"segments_streamed"`
	SegmentsDemanded  int64      `json:"segments_demanded"`
	DemandFetches     int64      `json:"demand_fetches"`
	DemandJoins       int64      `json:"demand_joins"`
	StreamPreemptions int64      `json:"stream_preemptions"`
	// AbandonedFetches counts fetches cancelled because every reader
	// waiting on them gave up.
	AbandonedFetches int64 `json:"abandoned_fetches"`
	BytesFetched     int64 `json:"bytes_fetched"`
	OverlayBytes     int64 `json:"overlay_bytes"`
	// Waits counts reads that waited for the network; WaitTotalMs sums
	// their waits, so overlapping waits count twice.
	Waits       int     `json:"waits"`
	WaitTotalMs float64 `json:"wait_total_ms"`
	WaitP50Ms   float64 `json:"wait_p50_ms"`
	WaitP99Ms   float64 `json:"wait_p99_ms"`
	// StallMs is wall-clock time in which at least one reader waited.
	StallMs         float64 `json:"stall_ms"`
	FetchErrors     int64   `json:"fetch_errors"`
	CorruptSegments int64   `json:"corrupt_segments"`
	FailedFetches   int64   `json:"failed_fetches"`
	Timeouts        int64   `json:"timeouts"`
	// UncachedSegments counts segments served from memory because the
	// cache could not store them; CacheBadSegments those cached by an
	// earlier mount that failed re-verification.
	UncachedSegments int64            `json:"uncached_segments"`
	CacheBadSegments int64            `json:"cache_bad_segments"`
	FailingSegments  []SegmentFailure `json:"failing_segments"`
	// ChunksDiscarded counts the chunks discarded whole through the mount
	// (fallocate punch-hole or zero-range) and not written since; they
	// read as zeros, and count in their image's Modified too.
	ChunksDiscarded int  `json:"chunks_discarded"`
	Complete        bool `json:"complete"`
	// Policy is "stream+demand" once the streamer was started, else
	// "demand-only": such a mount completes only if reads ask for every
	// segment.
	Policy string `json:"policy"`
	// Parent, in a layered overlay, is where its parent's chunks come
	// from, with the parent's own stats (its Parent the next layer down).
	Parent *ParentStats `json:"parent,omitempty"`
}

// ParentStats says where a layered overlay's parent is read from.
type ParentStats struct {
	ID string `json:"id"`
	// From is "cache" when every segment of the parent was in this
	// cloudlet's cache when the mount began (it ran the parent before),
	// else "url": the rest is fetched from URL.
	From          string `json:"from"`
	URL           string `json:"url"`
	CachedAtMount int    `json:"segments_cached_at_mount"`
	Stats         Stats  `json:"stats"`
}

// Stats returns a snapshot.
func (f *Fetcher) Stats() Stats {
	c := &f.st
	s := Stats{
		Segments:          len(f.segs),
		SegmentsStreamed:  c.streamSegments.Load(),
		SegmentsDemanded:  c.demandSegments.Load(),
		DemandFetches:     c.demandFetches.Load(),
		DemandJoins:       c.demandJoins.Load(),
		StreamPreemptions: c.preempted.Load(),
		AbandonedFetches:  c.abandoned.Load(),
		BytesFetched:      c.bytesFetched.Load(),
		OverlayBytes:      f.o.Header.TotalLen(),
		FetchErrors:       c.errors.Load(),
		CorruptSegments:   c.corrupt.Load(),
		FailedFetches:     c.failed.Load(),
		Timeouts:          c.timeouts.Load(),
		UncachedSegments:  c.uncached.Load(),
		CacheBadSegments:  c.cacheBad.Load(),
		FailingSegments:   []SegmentFailure{},
		Policy:            "demand-only",
	}
	if c.streaming.Load() {
		s.Policy = "stream+demand"
	}
	imgs := [2]*ImageStats{&s.Disk, &s.Memory}
	f.mu.Lock()
	s.SegmentsPresent = f.nPresent
	for _, img := range overlay.Images {
		is := imgs[img]
		is.Total = f.o.Header.Chunks(img)
		is.FromBase = c.base[img]
		is.FromParent = c.parent[img]
		is.Present = c.static[img]
	}
	now := time.Now()
	for seg, st := range f.segs {
		if st.present {
			for _, img := range overlay.Images {
				imgs[img].Present += c.perSeg[seg][img]
			}
			continue
		}
		if st.failures > 0 {
			retry := -1.0
			if !st.dead {
				retry = max(st.nextTry().Sub(now).Seconds(), 0)
			}
			s.FailingSegments = append(s.FailingSegments, SegmentFailure{Segment: seg, Failures: st.failures, LastError: st.lastErr.Error(), RetryInS: retry})
		}
	}
	f.mu.Unlock()
	f.cowMu.RLock()
	for _, img := range overlay.Images {
		for _, w := range f.cow[img] {
			if w != cowNone {
				imgs[img].Modified++
			}
		}
	}
	s.ChunksDiscarded = f.discarded
	f.cowMu.RUnlock()
	for _, img := range overlay.Images {
		imgs[img].Fetched = int(c.fetched[img].Load())
	}
	c.mu.Lock()
	waits := append([]time.Duration(nil), c.waits...)
	s.WaitTotalMs = ms(c.total)
	stalled := c.stalled
	if c.waiting > 0 {
		stalled += time.Since(c.since)
	}
	s.StallMs = ms(stalled)
	s.Waits = c.count
	c.mu.Unlock()
	if len(waits) > 0 {
		sort.Slice(waits, func(i, j int) bool { return waits[i] < waits[j] })
		s.WaitP50Ms = ms(waits[len(waits)/2])
		s.WaitP99Ms = ms(waits[len(waits)*99/100])
	}
	s.Complete = s.SegmentsPresent == s.Segments
	if p := f.opt.Parent; p != nil {
		ps := &ParentStats{ID: p.o.ID.String(), From: "url", URL: p.opt.Location, CachedAtMount: p.cachedAtOpen, Stats: p.Stats()}
		if p.cachedAtOpen == len(p.segs) {
			ps.From = "cache"
		}
		s.Parent = ps
		s.Complete = s.Complete && ps.Stats.Complete
	}
	return s
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
