package fetch

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// Cache is where verified chunks and written chunks live; store.Cache is
// the real one. Cached chunks are read at their image offsets.
type Cache interface {
	WriteSegment(seg int, chunks []store.ChunkData) error
	Segments() ([]int, error)
	ReadAt(img overlay.Image, p []byte, off int64) error
	PutCow(id overlay.ChunkID, data []byte) error
	Cow(id overlay.ChunkID, dst []byte) (bool, error)
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
	Log       zerolog.Logger
}

// Observer is told of every segment fetched, verified and cached, with the
// chunks it carried.
type Observer func(seg int, chunks []overlay.ChunkID, demand bool)

// Errors a read can fail with. The file system turns all of them into EIO.
var (
	ErrTimeout = errors.New("timed out waiting for the segment")
	ErrClosed  = errors.New("the mount is shutting down")
)

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
	present   []bool // per segment: verified and cached
	nPresent  int
	flights   map[int]*flight
	demanding int // demand flights running or waited on
	complete  chan struct{}

	// segOf maps each data or self chunk to the segment that carries its
	// bytes (-1 for zero and base chunks); selfOf lists, per data chunk,
	// the chunks that repeat it, so they are cached with it.
	segOf  [2][]int32
	selfOf map[overlay.ChunkID][]overlay.ChunkID

	cowMu  sync.RWMutex
	cow    [2][]bool
	anyCow atomic.Bool

	st       counters
	observer atomic.Pointer[Observer]
}

// Observe sets the function told of every fetched segment.
func (f *Fetcher) Observe(fn Observer) { f.observer.Store(&fn) }

// flight is one fetch of one segment; everyone who needs the segment waits
// on it.
type flight struct {
	done      chan struct{}
	err       error
	demand    bool // a reader waits on it: never preempt
	preempted bool
	cancel    context.CancelFunc
	gaveUp    time.Time // when a reader last stopped waiting on it at its deadline
}

// repeatWindow is how long after a reader gives up on a flight that new
// readers of it fail at once. The kernel answers a failed read-ahead by
// reading the one page the caller wants, at once: that is the same read to
// the caller, and must not wait a second timeout.
const repeatWindow = time.Second

// New prepares a fetcher. Segments already in the cache count as present
// and are never fetched again.
func New(src Source, o *overlay.Overlay, base *overlay.Base, cache Cache, opt Options) (*Fetcher, error) {
	if opt.Timeout <= 0 {
		opt.Timeout = 30 * time.Second
	}
	if opt.MaxDemand <= 0 {
		opt.MaxDemand = 8
	}
	if err := o.CheckBase(base); err != nil {
		return nil, err
	}
	f := &Fetcher{
		src: src, o: o, base: base, cache: cache, opt: opt,
		demand:   make(chan struct{}, opt.MaxDemand),
		wake:     make(chan struct{}, 1),
		present:  make([]bool, len(o.Manifest.Segments)),
		flights:  map[int]*flight{},
		selfOf:   map[overlay.ChunkID][]overlay.ChunkID{},
		complete: make(chan struct{}),
	}
	m := o.Manifest
	for _, img := range overlay.Images {
		f.cow[img] = make([]bool, len(m.Refs[img]))
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
		if s < len(f.present) && !f.present[s] {
			f.present[s] = true
			f.nPresent++
		}
	}
	cow, err := cache.CowChunks()
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	for _, c := range cow {
		if int(c.Index) < len(f.cow[c.Image]) {
			f.cow[c.Image][c.Index] = true
			f.anyCow.Store(true)
		}
	}
	f.st.init(o)
	if f.nPresent == len(f.present) {
		close(f.complete)
	}
	return f, nil
}

// Overlay returns the overlay being served.
func (f *Fetcher) Overlay() *overlay.Overlay { return f.o }

// Start launches the streamer.
func (f *Fetcher) Start() {
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

// Complete is closed when every segment is present.
func (f *Fetcher) Complete() <-chan struct{} { return f.complete }

// stream walks the segments in order, skipping those present, and fetches
// one at a time. It stands aside while any demand is outstanding, so the
// stream's bytes in flight never exceed one segment and never compete with
// a waiting reader.
func (f *Fetcher) stream() {
	defer f.wg.Done()
	backoff := newBackoff()
	next := 0
	for {
		f.mu.Lock()
		for next < len(f.present) && f.present[next] {
			next++
		}
		if next == len(f.present) {
			// Everything before next is present, but a segment after a
			// failed one may not be: start over until all are in.
			if f.nPresent == len(f.present) {
				f.mu.Unlock()
				return
			}
			next = 0
			f.mu.Unlock()
			continue
		}
		if f.ctx.Err() != nil {
			f.mu.Unlock()
			return
		}
		if f.demanding > 0 || f.flights[next] != nil {
			f.mu.Unlock()
			select {
			case <-f.wake:
			case <-f.ctx.Done():
				return
			}
			continue
		}
		fl := f.startLocked(next, false)
		f.mu.Unlock()
		select {
		case <-fl.done:
		case <-f.ctx.Done():
			return
		}
		if fl.err != nil && !fl.preempted {
			// Move on; the segment is tried again when the stream wraps
			// around, or sooner if a reader asks for it.
			f.opt.Log.Warn().Err(fl.err).Int("segment", next).Msg("stream: fetch failed; moving on")
			next++
			if !backoff.wait(f.ctx) {
				return
			}
			continue
		}
		backoff.reset()
	}
}

// startLocked starts a flight for segment seg. A demand flight preempts the
// stream's flight, which will be fetched again later.
func (f *Fetcher) startLocked(seg int, demand bool) *flight {
	// Readers' waits have their own deadline; a fetch may take longer
	// (a big segment on a slow link) and keeps going for later readers.
	// A demand fetch gives up after a few timeouts with no one served; the
	// stream's fetch only when cancelled.
	var ctx context.Context
	var cancel context.CancelFunc
	if demand {
		ctx, cancel = context.WithTimeout(f.ctx, 4*f.opt.Timeout)
	} else {
		ctx, cancel = context.WithCancel(f.ctx)
	}
	fl := &flight{done: make(chan struct{}), demand: demand, cancel: cancel}
	f.flights[seg] = fl
	if demand {
		f.demanding++
		f.preemptLocked(fl)
	}
	f.wg.Add(1)
	go f.run(ctx, seg, fl, demand)
	return fl
}

// preemptLocked cancels the stream's fetch, unless it is keep, the flight a
// reader is about to wait on.
func (f *Fetcher) preemptLocked(keep *flight) {
	for _, fl := range f.flights {
		if fl != keep && !fl.demand && !fl.preempted {
			fl.preempted = true
			fl.cancel()
			f.st.preempted.Add(1)
		}
	}
}

// run performs a flight. A flight started by a demand takes one of the
// demand slots; a stream flight never needs one.
func (f *Fetcher) run(ctx context.Context, seg int, fl *flight, demand bool) {
	defer f.wg.Done()
	defer fl.cancel()
	if demand {
		select {
		case f.demand <- struct{}{}:
			defer func() { <-f.demand }()
		case <-ctx.Done():
		}
	}
	err := f.fetch(ctx, seg, fl)
	f.mu.Lock()
	delete(f.flights, seg)
	if err == nil && !f.present[seg] {
		f.present[seg] = true
		f.nPresent++
		if f.nPresent == len(f.present) {
			close(f.complete)
		}
	}
	if fl.demand {
		f.demanding--
	}
	fl.err = err
	close(fl.done)
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// fetch gets, verifies and caches one segment. Network errors are retried
// with backoff until ctx ends; a segment that fails verification is fetched
// once more and then given up.
func (f *Fetcher) fetch(ctx context.Context, seg int, fl *flight) error {
	s := f.o.Manifest.Segments[seg]
	backoff := newBackoff()
	corrupt := 0
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		stored, err := f.src.ReadRange(ctx, s.Offset, int64(s.Stored))
		if err == nil {
			f.st.bytesFetched.Add(int64(len(stored)))
			var raw []byte
			if raw, err = overlay.DecodeSegment(seg, s, stored); err == nil {
				return f.keep(seg, s, raw, fl)
			}
			f.st.corrupt.Add(1)
			f.opt.Log.Error().Err(err).Int("segment", seg).Msg("segment failed verification")
			if corrupt++; corrupt > 1 {
				f.st.failed.Add(1)
				return err
			}
			continue
		}
		if ctx.Err() != nil {
			f.mu.Lock()
			preempted := fl.preempted
			f.mu.Unlock()
			if preempted {
				return ctx.Err()
			}
			return fmt.Errorf("segment %d: %w (last error: %v)", seg, ErrTimeout, err)
		}
		f.st.errors.Add(1)
		if errors.Is(err, ErrNoRange) {
			f.st.failed.Add(1)
			return err
		}
		f.opt.Log.Warn().Err(err).Int("segment", seg).Str("source", f.src.String()).Msg("fetch failed; retrying")
		if !backoff.wait(ctx) {
			return fmt.Errorf("segment %d: %w (last error: %v)", seg, ErrTimeout, err)
		}
	}
}

// keep caches a verified segment's chunks, and the chunks that repeat
// them, at their offsets.
func (f *Fetcher) keep(seg int, s overlay.Segment, raw []byte, fl *flight) error {
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
		return fmt.Errorf("segment %d: cache: %w", seg, err)
	}
	f.mu.Lock()
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
	return nil
}

// request makes sure a fetch of segment seg is under way or done, for a
// reader about to wait on it, and returns that flight (nil if the segment
// is present).
func (f *Fetcher) requestLocked(seg int) (*flight, error) {
	if f.present[seg] {
		return nil, nil
	}
	if f.ctx.Err() != nil {
		return nil, ErrClosed
	}
	fl := f.flights[seg]
	switch {
	case fl == nil:
		fl = f.startLocked(seg, true)
		f.st.demandFetches.Add(1)
	case fl.preempted:
		// The stream's fetch is being cancelled: the caller waits for it
		// to end, then asks again.
	case !fl.demand:
		fl.demand = true
		f.demanding++
		f.preemptLocked(fl)
		f.st.demandJoins.Add(1)
	default:
		f.st.demandJoins.Add(1)
	}
	return fl, nil
}

// ensure returns once every segment in segs is present, or with an error
// when a fetch fails, the wait outlasts the timeout, a reader gave up on
// one of the fetches less than repeatWindow ago, or the fetcher closes.
// All the fetches are requested before any is waited on, and one deadline
// covers them all.
func (f *Fetcher) ensure(ctx context.Context, segs ...int) error {
	deadline := time.NewTimer(f.opt.Timeout)
	defer deadline.Stop()
	start := time.Now()
	stalled := false
	defer func() {
		if stalled {
			f.st.stall(time.Since(start))
		}
	}()
	for {
		f.mu.Lock()
		var wait []*flight
		for _, seg := range segs {
			fl, err := f.requestLocked(seg)
			if err != nil {
				f.mu.Unlock()
				return err
			}
			if fl == nil {
				continue
			}
			if !fl.gaveUp.IsZero() && time.Since(fl.gaveUp) < min(f.opt.Timeout, repeatWindow) {
				f.mu.Unlock()
				return fmt.Errorf("segment %d: %w: a read gave up on it %s ago", seg, ErrTimeout, time.Since(fl.gaveUp).Round(time.Millisecond))
			}
			wait = append(wait, fl)
		}
		f.mu.Unlock()
		if len(wait) == 0 {
			return nil
		}
		stalled = true
		for _, fl := range wait {
			select {
			case <-fl.done:
				if fl.err != nil && !fl.preempted {
					return fl.err
				}
			case <-deadline.C:
				f.st.timeouts.Add(1)
				f.mu.Lock()
				now := time.Now()
				for _, w := range wait {
					w.gaveUp = now
				}
				f.mu.Unlock()
				return fmt.Errorf("%w after %s", ErrTimeout, f.opt.Timeout)
			case <-ctx.Done():
				return ctx.Err()
			case <-f.ctx.Done():
				return ErrClosed
			}
		}
	}
}

// backoff doubles a wait from 50 ms up to 2 s.
type backoff struct{ d time.Duration }

func newBackoff() *backoff { return &backoff{d: 50 * time.Millisecond} }
func (b *backoff) reset()  { b.d = 50 * time.Millisecond }

// wait sleeps for the current delay and doubles it; false if ctx ended.
func (b *backoff) wait(ctx context.Context) bool {
	t := time.NewTimer(b.d)
	defer t.Stop()
	b.d = min(2*b.d, 2*time.Second)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// counters are the fetcher's running totals.
type counters struct {
	bytesFetched, corrupt, errors, failed, timeouts atomic.Int64
	demandFetches, demandJoins, preempted           atomic.Int64
	demandSegments, streamSegments                  atomic.Int64
	fetched                                         [2]atomic.Int64 // chunks, per image

	mu     sync.Mutex
	stalls []time.Duration
	total  time.Duration

	// per image: chunks that need no network, and per segment the chunks
	// of each image that it supplies
	static [2]int
	perSeg [][2]int
	base   [2]int
}

const maxStalls = 1 << 16

func (c *counters) stall(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total += d
	if len(c.stalls) < maxStalls {
		c.stalls = append(c.stalls, d)
	} else {
		c.stalls[int(c.total)%maxStalls] = d
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
	Total    int `json:"total"`
	Present  int `json:"present"`
	FromBase int `json:"from_base"`
	Fetched  int `json:"fetched"`
	Modified int `json:"modified"`
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
	BytesFetched      int64      `json:"bytes_fetched"`
	OverlayBytes      int64      `json:"overlay_bytes"`
	Stalls            int        `json:"stalls"`
	StallTotalMs      float64    `json:"stall_total_ms"`
	StallP50Ms        float64    `json:"stall_p50_ms"`
	StallP99Ms        float64    `json:"stall_p99_ms"`
	FetchErrors       int64      `json:"fetch_errors"`
	CorruptSegments   int64      `json:"corrupt_segments"`
	FailedFetches     int64      `json:"failed_fetches"`
	Timeouts          int64      `json:"timeouts"`
	Complete          bool       `json:"complete"`

	Waits           int              `json:"waits"`
	WaitTotalMs     float64          `json:"wait_total_ms"`
	WaitP50Ms       float64          `json:"wait_p50_ms"`
	WaitP99Ms       float64          `json:"wait_p99_ms"`
	StallMs         float64          `json:"stall_ms"`
	FailingSegments []SegmentFailure `json:"failing_segments"`
}

// SegmentFailure is a segment whose fetches keep failing.
type SegmentFailure struct {
	Segment   int     `json:"segment"`
	Failures  int     `json:"failures"`
	LastError string  `json:"last_error"`
	RetryInS  float64 `json:"retry_in_s"`
}

// Stats returns a snapshot.
func (f *Fetcher) Stats() Stats {
	c := &f.st
	s := Stats{
		Segments:          len(f.present),
		SegmentsStreamed:  c.streamSegments.Load(),
		SegmentsDemanded:  c.demandSegments.Load(),
		DemandFetches:     c.demandFetches.Load(),
		DemandJoins:       c.demandJoins.Load(),
		StreamPreemptions: c.preempted.Load(),
		BytesFetched:      c.bytesFetched.Load(),
		OverlayBytes:      f.o.Header.TotalLen(),
		FetchErrors:       c.errors.Load(),
		CorruptSegments:   c.corrupt.Load(),
		FailedFetches:     c.failed.Load(),
		Timeouts:          c.timeouts.Load(),
	}
	imgs := [2]*ImageStats{&s.Disk, &s.Memory}
	f.mu.Lock()
	s.SegmentsPresent = f.nPresent
	for _, img := range overlay.Images {
		is := imgs[img]
		is.Total = f.o.Header.Chunks(img)
		is.FromBase = c.base[img]
		is.Present = c.static[img]
	}
	for seg, p := range f.present {
		if p {
			for _, img := range overlay.Images {
				imgs[img].Present += c.perSeg[seg][img]
			}
		}
	}
	f.mu.Unlock()
	f.cowMu.RLock()
	for _, img := range overlay.Images {
		for _, w := range f.cow[img] {
			if w {
				imgs[img].Modified++
			}
		}
	}
	f.cowMu.RUnlock()
	for _, img := range overlay.Images {
		imgs[img].Fetched = int(c.fetched[img].Load())
	}
	c.mu.Lock()
	stalls := append([]time.Duration(nil), c.stalls...)
	s.StallTotalMs = ms(c.total)
	c.mu.Unlock()
	s.Stalls = len(stalls)
	if len(stalls) > 0 {
		sort.Slice(stalls, func(i, j int) bool { return stalls[i] < stalls[j] })
		s.StallP50Ms = ms(stalls[len(stalls)/2])
		s.StallP99Ms = ms(stalls[len(stalls)*99/100])
	}
	s.Complete = s.SegmentsPresent == s.Segments
	return s
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
