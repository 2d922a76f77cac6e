package fetch_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// rig is an overlay of random data against a random base, opened through
// a source the test can tamper with.
type rig struct {
	path  string // the overlay file
	st    *store.Store
	o     *overlay.Overlay
	base  *overlay.Base
	cache *store.Cache
	src   *hookSource
}

// hookSource is a file source with a hook in front of every read: the seam
// for faults the file cannot produce.
type hookSource struct {
	fetch.Source
	hook func(ctx context.Context, off int64, b []byte) ([]byte, error)
}

func (h *hookSource) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	b, err := h.Source.ReadRange(ctx, off, n)
	if err == nil && h.hook != nil {
		return h.hook(ctx, off, b)
	}
	return b, err
}

func newRig(t *testing.T) *rig {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 1))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	bd, bm := random(64*4096), random(64*4096)
	cd, cm := random(64*4096), append([]byte(nil), bm...)
	idx := &overlay.Index{ChunkSize: 4096, Sizes: [2]int64{int64(len(bd)), int64(len(bm))}}
	for img, b := range [][]byte{bd, bm} {
		_, hs, err := overlay.HashImage(bytes.NewReader(b), int64(len(b)), 4096, 2, nil)
		if err != nil {
			t.Fatal(err)
		}
		idx.Hashes[img] = hs
	}
	base := &overlay.Base{Images: [2]io.ReaderAt{bytes.NewReader(bd), bytes.NewReader(bm)}, Index: idx}
	path := filepath.Join(dir, "o")
	in := &overlay.Input{Images: [2]io.ReaderAt{bytes.NewReader(cd), bytes.NewReader(cm)}, Sizes: [2]int64{int64(len(cd)), int64(len(cm))}, State: []byte("s")}
	if _, err := overlay.Build(path, base, in, overlay.BuildOptions{Codec: overlay.CodecZstd, SegmentSize: 16 * 4096}); err != nil {
		t.Fatal(err)
	}
	src, err := fetch.OpenSource(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	o, err := fetch.OpenOverlay(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	cache, err := st.OpenCache(o.ID, 4096, [2]int64{int64(len(cd)), int64(len(cm))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	return &rig{path: path, st: st, o: o, base: base, cache: cache, src: &hookSource{Source: src}}
}

func (r *rig) fetcher(t *testing.T, timeout time.Duration) *fetch.Fetcher {
	f, err := fetch.New(r.src, r.o, r.base, r.cache, fetch.Options{Timeout: timeout, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	return f
}

// Closing the fetcher while readers wait wakes every one of them with
// ErrClosed at once, and never panics.
func TestCloseWhileReading(t *testing.T) {
	r := newRig(t)
	stall := make(chan struct{})
	defer close(stall)
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		select {
		case <-stall:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return b, nil
	}
	f := r.fetcher(t, time.Minute)
	const readers = 8
	errs := make(chan error, readers)
	for i := range readers {
		go func() {
			buf := make([]byte, 4096)
			errs <- f.ReadAt(context.Background(), overlay.Disk, buf, int64(i*8)*4096)
		}()
	}
	// Every reader is waiting on a fetch before the close.
	deadline := time.Now().Add(10 * time.Second)
	for f.Waiting() < readers {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d readers waiting after 10 s", f.Waiting(), readers)
		}
		time.Sleep(time.Millisecond)
	}
	closed := make(chan struct{})
	go func() { f.Close(); close(closed) }()
	limit := time.After(5 * time.Second)
	for range readers {
		select {
		case err := <-errs:
			if !errors.Is(err, fetch.ErrClosed) {
				t.Fatalf("a waiting reader returned %v, want ErrClosed", err)
			}
		case <-limit:
			t.Fatal("readers still waiting 5 s after Close")
		}
	}
	select {
	case <-closed:
	case <-limit:
		t.Fatal("Close not done 5 s after it began")
	}
	// A read after the close fails at once too.
	if err := f.ReadAt(context.Background(), overlay.Disk, make([]byte, 10), 0); !errors.Is(err, fetch.ErrClosed) {
		t.Fatalf("read after Close: %v, want ErrClosed", err)
	}
}

// A segment that never verifies does not stop the stream: every other
// segment still arrives, and the bad one is never marked present.
func TestStreamMovesPastABadSegment(t *testing.T) {
	r := newRig(t)
	first := r.o.Manifest.Segments[0]
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		if off == first.Offset {
			b = append([]byte(nil), b...)
			b[0] ^= 1
		}
		return b, nil
	}
	f := r.fetcher(t, 5*time.Second)
	arrived := make(chan int, len(r.o.Manifest.Segments))
	f.Observe(func(seg int, _ []overlay.ChunkID, _ bool) { arrived <- seg })
	f.Start()
	deadline := time.After(20 * time.Second)
	got := map[int]bool{}
	for len(got) < len(r.o.Manifest.Segments)-1 {
		select {
		case seg := <-arrived:
			got[seg] = true
		case <-deadline:
			t.Fatalf("the stream stalled behind a bad segment: %+v", f.Stats())
		}
	}
	if st := f.Stats(); got[0] || st.CorruptSegments == 0 || st.SegmentsPresent != st.Segments-1 {
		t.Fatalf("stats: %+v", st)
	}
	select {
	case <-f.Complete():
		t.Fatal("complete with a bad segment")
	default:
	}
	buf := make([]byte, 4096)
	id := r.o.Manifest.Order[first.First]
	if err := f.ReadAt(context.Background(), id.Image, buf, int64(id.Index)*4096); err == nil || errors.Is(err, fetch.ErrClosed) {
		t.Fatalf("read of the bad segment: %v", err)
	}
}

// awaitComplete waits for every segment to be present, failing the test
// with msg and the fetcher's stats if that takes longer than within.
func awaitComplete(t testing.TB, f *fetch.Fetcher, within time.Duration, msg string) {
	t.Helper()
	select {
	case <-f.Complete():
	case <-time.After(within):
		t.Fatalf("%s: %+v", msg, f.Stats())
	}
}
