package fs

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// Errors from fetch and the store reach the caller as the errno that says
// what to do: free space, make the state dir writable, retry the
// interrupted call, or nothing (EIO).
func TestErrnoOf(t *testing.T) {
	live := context.Background()
	interrupted, cancel := context.WithCancel(context.Background())
	cancel()
	for _, c := range []struct {
		ctx  context.Context
		err  error
		want syscall.Errno
	}{
		{live, fmt.Errorf("cache: write chunk 7: %w", syscall.ENOSPC), syscall.ENOSPC},
		{live, fmt.Errorf("cache: sync: %w", syscall.EROFS), syscall.EROFS},
		{interrupted, fmt.Errorf("segment 3: %w", context.Canceled), syscall.EINTR},
		// Canceled, but not by the kernel: the mount shutting down.
		{live, fmt.Errorf("segment 3: %w", context.Canceled), syscall.EIO},
		{interrupted, fmt.Errorf("segment 3: %w", context.DeadlineExceeded), syscall.EIO},
		{live, fmt.Errorf("%w after 10s", fetch.ErrTimeout), syscall.EIO},
		{live, errors.New("sha256 mismatch"), syscall.EIO},
	} {
		if got := errnoOf(c.ctx, c.err); got != c.want {
			t.Errorf("errnoOf(%v) with the request's context %v: %v, want %v", c.err, c.ctx.Err(), got, c.want)
		}
	}
}
