package fs_test

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// A read that waits on a segment the server never finishes, interrupted by
// a signal, returns EINTR: the kernel sends FUSE_INTERRUPT, go-fuse cancels
// the request's context, and the read answers EINTR rather than EIO.
//
// The read is O_DIRECT: a buffered read waits for the page it asked the
// kernel to read ahead, and that wait only a fatal signal ends. The signal
// is sent once the server has the segment's request, so the read is in
// the daemon's hands: a signal that came before would make the kernel drop
// the read itself, and prove nothing.
func TestInterruptedReadIsEINTR(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	requested := make(chan struct{}, 16)
	release := make(chan struct{})
	srv.setFault(func(w http.ResponseWriter, r *http.Request) bool {
		if isMeta(r) {
			return false
		}
		requested <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return true
	})
	// Long enough that only the signal can end the read.
	const timeout = 60 * time.Second
	m, err := v.mountWith(t, srv.URL+"/app.overlay", timeout, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(release) })

	o := m.f.Overlay()
	id := o.Manifest.Order[v.segments[len(v.segments)/2].First]
	off := int64(id.Index) * int64(o.Header.ChunkSize)
	type result struct {
		n   int
		err error
	}
	tids := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		// The signal goes to this thread, so the goroutine must stay on it.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		fd, err := syscall.Open(m.path(id.Image), syscall.O_RDONLY|syscall.O_DIRECT, 0)
		if err != nil {
			tids <- -1
			done <- result{err: err}
			return
		}
		defer syscall.Close(fd)
		buf, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE) // page-aligned for O_DIRECT
		if err != nil {
			tids <- -1
			done <- result{err: err}
			return
		}
		defer syscall.Munmap(buf)
		tids <- syscall.Gettid()
		n, err := syscall.Pread(fd, buf, off)
		done <- result{n, err}
	}()
	tid := <-tids
	select {
	case <-requested:
	case r := <-done:
		t.Fatalf("the read ended before the server was asked for its segment: %d bytes, %v", r.n, r.err)
	case <-time.After(10 * time.Second):
		t.Fatal("the server got no segment request within 10 s of the read")
	}
	// Go's handler for SIGURG does nothing outside preemption, so the
	// signal disturbs nothing but the read.
	start := time.Now()
	if err := syscall.Tgkill(os.Getpid(), tid, syscall.SIGURG); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if !errors.Is(r.err, syscall.EINTR) {
			t.Fatalf("interrupted read: %d bytes, %v; want EINTR", r.n, r.err)
		}
		if took := time.Since(start); took > timeout/2 {
			t.Fatalf("the read ended %s after the signal, by its timeout of %s rather than the signal", took, timeout)
		}
	case <-time.After(timeout / 2):
		t.Fatalf("the read did not end within %s of the signal", timeout/2)
	}
}
