package session

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/fetch"
	cfs "github.com/cloudletfs/cloudletfs/fs"
)

// mountFUSE mounts the file system at dir over a FUSE device opened
// close-on-exec.
//
// The kernel keeps a FUSE connection while any process holds a descriptor
// of it. A child that inherited the daemon's descriptor, QEMU above all,
// keeps the connection of a daemon that died: the mount neither fails nor
// answers, and the child cannot even exit, waiting in exit_mmap on
// writeback through the connection it holds itself. go-fuse's direct mount
// (as root) opens /dev/fuse without O_CLOEXEC and never sets it, so every
// child started later inherits it. Here the device is opened with O_CLOEXEC
// in the same system call, so no fork in any goroutine can ever see it
// without the flag; the mount is made over it and the descriptor handed to
// go-fuse as /dev/fd/N, which go-fuse serves without mounting again.
//
// Without the privilege to mount, go-fuse mounts through fusermount and
// sets the flag itself on the descriptor fusermount passes back.
func mountFUSE(dir string, f *fetch.Fetcher, opt cfs.Options) (*cfs.Mount, error) {
	fd, err := syscall.Open("/dev/fuse", syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return cfs.New(dir, f, opt)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	// The options go-fuse's direct mount passes; max_read is go-fuse's
	// default request size.
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d",
		fd, st.Mode&syscall.S_IFMT, os.Geteuid(), os.Getegid(), 128<<10)
	if opt.AllowOther {
		data += ",allow_other"
	}
	if err := syscall.Mount("cloudletfs", dir, FSType, syscall.MS_NOSUID|syscall.MS_NODEV, data); err != nil {
		syscall.Close(fd)
		if errors.Is(err, syscall.EPERM) {
			return cfs.New(dir, f, opt)
		}
		return nil, err
	}
	// go-fuse gets a duplicate: it closes its descriptor on some of its
	// failures and not on others, so closing the one given to it here could
	// close an unrelated file that took the number. This one is closed
	// either way; the connection lives on in go-fuse's when it serves.
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		syscall.Close(fd)
		syscall.Unmount(dir, syscall.MNT_DETACH)
		return nil, fmt.Errorf("duplicating the FUSE device: %w", err)
	}
	m, err := cfs.New(fmt.Sprintf("/dev/fd/%d", dup), f, opt)
	syscall.Close(fd)
	if err != nil {
		syscall.Unmount(dir, syscall.MNT_DETACH)
		return nil, err
	}
	pollHack(dir)
	return m, nil
}

// pollHack does for a mount made here what go-fuse does after a mount of
// its own: it polls a file go-fuse answers for, so the kernel learns at
// once that the file system does not implement poll and never sends a
// POLL request again.
func pollHack(dir string) {
	fd, err := syscall.Open(filepath.Join(dir, ".go-fuse-epoll-hack"), syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	syscall.Close(fd)
}
