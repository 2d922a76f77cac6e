package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"

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

// A full or read-only state dir fails every write until it is fixed. The
// store says so once (TestFullStateDir counts the lines through a real
// mount); the file system adds no line of its own for each failed write,
// but still reports other failures at error level.
func TestStateDirFailureLeftToTheStore(t *testing.T) {
	var out bytes.Buffer
	m := &Mount{log: zerolog.New(&out).Level(zerolog.InfoLevel)}
	for range 3 {
		for _, errno := range []syscall.Errno{syscall.ENOSPC, syscall.EROFS} {
			m.logFailure(errno, errno).Msg("write failed")
		}
	}
	if out.Len() != 0 {
		t.Fatalf("failed writes on a full state dir logged at info level or above:\n%s", out.String())
	}
	m.logFailure(syscall.EIO, errors.New("sha256 mismatch")).Msg("read failed")
	if n := strings.Count(out.String(), `"level":"error"`); n != 1 {
		t.Fatalf("an EIO was not logged at error level:\n%s", out.String())
	}
}
