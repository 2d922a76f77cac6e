// Command loopback mounts a directory through go-fuse's loopback file
// system, as a baseline for the disk I/O benchmark (tools/bench-io.sh): the
// cost of FUSE itself, next to the plain file and a cloudletfs mount.
//
//	go run ./tools/loopback DIR MOUNTPOINT
//
// It prints "ready" once the mount is up and serves until SIGINT or
// SIGTERM, then unmounts. Passthrough is kept off, so every read and write
// comes to this process as it does to cloudletfs, which cannot hand the
// kernel a file for data that may not have arrived.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: loopback DIR MOUNTPOINT\n\nmounts DIR at MOUNTPOINT through go-fuse's loopback (no passthrough) until SIGINT or SIGTERM")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "loopback:", err)
		os.Exit(1)
	}
}

func run(dir, mnt string) error {
	root, err := fusefs.NewLoopbackRoot(dir)
	if err != nil {
		return fmt.Errorf("loopback of %s: %w", dir, err)
	}
	root = &node{root.(*fusefs.LoopbackNode)}
	srv, err := fusefs.Mount(mnt, root, &fusefs.Options{MountOptions: fuse.MountOptions{FsName: "loopback", DirectMount: true}})
	if err != nil {
		return fmt.Errorf("mounting %s at %s: %w", dir, mnt, err)
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		srv.Unmount()
	}()
	srv.Wait()
	return nil
}

// node is a loopback node whose open files offer no passthrough fd, and
// so are its children.
type node struct{ *fusefs.LoopbackNode }

var (
	_ = (fusefs.NodeOpener)((*node)(nil))
	_ = (fusefs.NodeWrapChilder)((*node)(nil))
)

func (n *node) WrapChild(ctx context.Context, ops fusefs.InodeEmbedder) fusefs.InodeEmbedder {
	return &node{ops.(*fusefs.LoopbackNode)}
}

func (n *node) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &file{fh}, fl, 0
}

// file forwards what fio needs to go-fuse's loopback file, and nothing
// else: the kernel asks a file without PassthroughFd for every byte.
type file struct{ fh fusefs.FileHandle }

var (
	_ = (fusefs.FileReader)((*file)(nil))
	_ = (fusefs.FileWriter)((*file)(nil))
	_ = (fusefs.FileFsyncer)((*file)(nil))
	_ = (fusefs.FileFlusher)((*file)(nil))
	_ = (fusefs.FileReleaser)((*file)(nil))
	_ = (fusefs.FileGetattrer)((*file)(nil))
	_ = (fusefs.FileAllocater)((*file)(nil))
)

func (f *file) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return f.fh.(fusefs.FileReader).Read(ctx, dest, off)
}

func (f *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	return f.fh.(fusefs.FileWriter).Write(ctx, data, off)
}

func (f *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	return f.fh.(fusefs.FileFsyncer).Fsync(ctx, flags)
}

func (f *file) Flush(ctx context.Context) syscall.Errno {
	return f.fh.(fusefs.FileFlusher).Flush(ctx)
}

func (f *file) Release(ctx context.Context) syscall.Errno {
	return f.fh.(fusefs.FileReleaser).Release(ctx)
}

func (f *file) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return f.fh.(fusefs.FileGetattrer).Getattr(ctx, out)
}

func (f *file) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	return f.fh.(fusefs.FileAllocater).Allocate(ctx, off, size, mode)
}
