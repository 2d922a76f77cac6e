package fetch_test

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// A read of a stalled segment fails at its deadline, and the fetch it alone
// waited on is cancelled. The kernel then asks again at once for the page
// the caller wants: that read fails at once too, rather than waiting a
// second timeout, so the caller sees EIO one timeout after it asked. A read
// of another part of the segment, or one that comes later, waits its own
// full timeout on a fetch started anew.
func TestRepeatAfterTimeoutFailsAtOnce(t *testing.T) {
	r := newRig(t)
	stall := make(chan struct{})
	defer close(stall)
	cut := make(chan struct{}, 8)
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		select {
		case <-stall:
			return b, nil
		case <-ctx.Done():
			cut <- struct{}{}
			return nil, ctx.Err()
		}
	}
	const timeout = time.Second
	f := r.fetcher(t, timeout)
	id := r.o.Manifest.Order[r.o.Manifest.Segments[0].First]
	readAt := func(off int64, n int) (time.Duration, error) {
		start := time.Now()
		err := f.ReadAt(context.Background(), id.Image, make([]byte, n), int64(id.Index)*4096+off)
		return time.Since(start), err
	}
	read := func() (time.Duration, error) { return readAt(0, 4096) }
	if took, err := readAt(0, 8192); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("first read: %v after %s, want a timeout after %s", err, took, timeout)
	}
	// The fetch no reader waits on any more is cancelled.
	select {
	case <-cut:
	case <-time.After(5 * time.Second):
		t.Fatal("the fetch was not cancelled when its only reader gave up")
	}
	if took, err := read(); !errors.Is(err, fetch.ErrTimeout) || took > timeout/4 {
		t.Fatalf("repeated read within the same range: %v after %s, want a timeout at once", err, took)
	}
	// Another reader of the same segment, whose range the timed-out read
	// did not cover, is not failed by it.
	if took, err := readAt(8192, 100); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("read of another range: %v after %s, want a timeout after %s", err, took, timeout)
	}
	// Past the window (a second, the timeout here), a read waits its whole
	// timeout again on a fetch started anew.
	<-time.After(timeout)
	if took, err := read(); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("later read: %v after %s, want a timeout after %s", err, took, timeout)
	}
	if st := f.Stats(); st.Timeouts != 3 || st.DemandFetches != 3 || st.AbandonedFetches != 3 {
		t.Fatalf("want three timeouts, each cancelling its own fetch: %+v", st)
	}
}

// A reader that joins the stream's fetch of a segment waits no longer than
// its own timeout, and when it gives up the stream's fetch goes on: on a
// link where a segment takes longer than the timeout, a reader that gives
// up must not throw the stream's partial download away. The segment then
// arrives from that one download, and a later read gets its bytes.
func TestJoinedStreamFetchTakesReadersDeadline(t *testing.T) {
	r := newRig(t)
	first := r.o.Manifest.Segments[0]
	entered := make(chan struct{}, 8)
	release := make(chan struct{})
	var downloads, cut atomic.Int32
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		if off != first.Offset {
			return b, nil
		}
		downloads.Add(1)
		entered <- struct{}{}
		select {
		case <-release:
			return b, nil
		case <-ctx.Done():
			cut.Add(1)
			return nil, ctx.Err()
		}
	}
	const timeout = 300 * time.Millisecond
	f := r.fetcher(t, timeout)
	f.Start()
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not start on segment 0 within 5 s")
	}
	id := r.o.Manifest.Order[first.First]
	img, off := id.Image, int64(id.Index)*4096
	start := time.Now()
	err := f.ReadAt(context.Background(), img, make([]byte, 100), off)
	if took := time.Since(start); !errors.Is(err, fetch.ErrTimeout) || took > timeout+time.Second {
		t.Fatalf("read joined to a slow stream fetch: %v after %s, want a timeout after %s", err, took, timeout)
	}
	// The rest of the slow segment arrives only now, after the reader
	// gave up: its download must still be the one under way.
	close(release)
	awaitComplete(t, f, 10*time.Second, "not complete 10 s after the slow segment was let through")
	if n, c := downloads.Load(), cut.Load(); n != 1 || c != 0 {
		t.Fatalf("segment 0 downloaded %d times, %d of them cut, want once and never cut: the reader that gave up cancelled the stream's fetch", n, c)
	}
	if st := f.Stats(); st.DemandJoins != 1 || st.DemandFetches != 0 || st.AbandonedFetches != 0 {
		t.Fatalf("want one join and no abandoned fetch: %+v", st)
	}
	got := make([]byte, 100)
	if err := f.ReadAt(context.Background(), img, got, off); err != nil {
		t.Fatalf("read after the segment arrived: %v", err)
	}
	if !bytes.Equal(got, r.image(t, img)[off:off+100]) {
		t.Fatal("read after the segment arrived: wrong bytes")
	}
	if n := downloads.Load(); n != 1 {
		t.Fatalf("the later read downloaded segment 0 again (%d downloads)", n)
	}
}
