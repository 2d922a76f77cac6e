package fetch_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// A read of a stalled segment fails at its deadline. The kernel then asks
// again at once for the page the caller wants: that read fails at once too,
// rather than waiting a second timeout for the same fetch, so the caller
// sees EIO one timeout after it asked. A read that comes later waits its
// own full timeout.
func TestRepeatAfterTimeoutFailsAtOnce(t *testing.T) {
	r := newRig(t)
	stall := make(chan struct{})
	defer close(stall)
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		select {
		case <-stall:
			return b, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	const timeout = 300 * time.Millisecond
	f := r.fetcher(t, timeout)
	id := r.o.Manifest.Order[r.o.Manifest.Segments[0].First]
	read := func() (time.Duration, error) {
		start := time.Now()
		err := f.ReadAt(context.Background(), id.Image, make([]byte, 4096), int64(id.Index)*4096)
		return time.Since(start), err
	}
	if took, err := read(); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("first read: %v after %s, want a timeout after %s", err, took, timeout)
	}
	if took, err := read(); !errors.Is(err, fetch.ErrTimeout) || took > timeout/3 {
		t.Fatalf("repeated read: %v after %s, want a timeout at once", err, took)
	}
	// Past the window (the timeout here, as it is under a second), a read
	// waits its whole timeout again on the fetch still going.
	<-time.After(timeout)
	if took, err := read(); !errors.Is(err, fetch.ErrTimeout) || took < timeout {
		t.Fatalf("later read: %v after %s, want a timeout after %s", err, took, timeout)
	}
	if st := f.Stats(); st.Timeouts != 2 || st.DemandFetches != 1 {
		t.Fatalf("want two timeouts on one demand fetch: %+v", st)
	}
}
