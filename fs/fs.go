// Package fs is the cloudletfs file system: the go-fuse tree that presents a
// mounted overlay as disk/image, memory/image, state, vm.json, stats and
// streams/. Image reads take each chunk from written data, the base, the
// cache or a fetch, all through package fetch; writes are copy-on-write into
// the store. It fetches nothing itself.
package fs

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// Options configure a mount.
type Options struct {
	Log        zerolog.Logger
	AllowOther bool // let users other than the mounting one in
	Debug      bool // log every FUSE request
}

// Mount is a mounted overlay.
type Mount struct {
	Dir    string
	server *fuse.Server
	f      *fetch.Fetcher
	rec    *recorder
	log    zerolog.Logger
}

// New mounts the overlay that f serves at dir and returns once the kernel
// has the mount, which is the moment a VM can start.
func New(dir string, f *fetch.Fetcher, opt Options) (*Mount, error) {
	m := &Mount{Dir: dir, f: f, rec: newRecorder(f.Overlay().Header), log: opt.Log}
	f.Observe(m.rec.arrived)
	root := &dirNode{}
	sec := time.Second
	server, err := fusefs.Mount(dir, root, &fusefs.Options{
		EntryTimeout: &sec,
		AttrTimeout:  &sec,
		MountOptions: fuse.MountOptions{
			FsName:        "cloudletfs",
			Name:          "cloudletfs",
			AllowOther:    opt.AllowOther,
			DisableXAttrs: true,
			DirectMount:   !strings.HasPrefix(dir, "/dev/fd/"), // else a device the caller mounted itself
			MaxReadAhead:  128 << 10,
			Debug:         opt.Debug,
		},
		OnAdd: func(ctx context.Context) { m.build(ctx, &root.Inode) },
	})
	if err != nil {
		return nil, err
	}
	m.server = server
	m.rec.ready()
	return m, nil
}

// Unmount detaches the file system. Readers waiting on fetches are woken by
// closing the fetcher first.
func (m *Mount) Unmount() error { return m.server.Unmount() }

// Wait blocks until the file system is unmounted, by Unmount or from
// outside (`cloudletfs umount`, fusermount -u).
func (m *Mount) Wait() { m.server.Wait() }

// Trace returns the first access of every chunk so far, timed from ready,
// and the marks.
func (m *Mount) Trace() *order.Trace { return m.rec.Trace() }

// WriteTrace writes the trace so far in the trace format, as Trace and
// order.Write would, without a second copy of it in memory.
func (m *Mount) WriteTrace(w io.Writer) error { return m.rec.writeTrace(w) }

// Mark records a named moment, such as a probe's first success, in the trace.
func (m *Mount) Mark(name string) { m.rec.mark(name) }

// Stats returns what the stats file shows.
func (m *Mount) Stats() fetch.Stats { return m.f.Stats() }

func (m *Mount) build(ctx context.Context, root *fusefs.Inode) {
	o := m.f.Overlay()
	add := func(parent *fusefs.Inode, name string, node fusefs.InodeEmbedder, mode uint32) *fusefs.Inode {
		child := parent.NewPersistentInode(ctx, node, fusefs.StableAttr{Mode: mode})
		parent.AddChild(name, child, false)
		return child
	}
	for _, img := range overlay.Images {
		dir := add(root, img.String(), &dirNode{}, syscall.S_IFDIR)
		add(dir, "image", &imageNode{m: m, img: img, size: o.Header.ImageSize(img)}, syscall.S_IFREG)
	}
	add(root, "state", &fusefs.MemRegularFile{Data: o.State, Attr: fuse.Attr{Mode: 0o444}}, syscall.S_IFREG)
	if o.VMConfig != nil {
		add(root, "vm.json", &fusefs.MemRegularFile{Data: o.VMConfig, Attr: fuse.Attr{Mode: 0o444}}, syscall.S_IFREG)
	}
	add(root, "stats", &statsNode{m: m}, syscall.S_IFREG)
	streams := add(root, "streams", &dirNode{}, syscall.S_IFDIR)
	for name, l := range map[string]*eventLog{
		"chunks_accessed": &m.rec.accessed, "chunks_fetched": &m.rec.fetched,
		"chunks_modified": &m.rec.modifiedLog, "io": &m.rec.io,
	} {
		add(streams, name, &streamNode{log: l}, syscall.S_IFREG)
	}
}

type dirNode struct{ fusefs.Inode }

// imageNode is disk/image or memory/image.
type imageNode struct {
	fusefs.Inode
	m    *Mount
	img  overlay.Image
	size int64

	// locks serialize read-modify-write of a chunk by concurrent writers.
	locks [64]sync.Mutex
}

var (
	_ = (fusefs.NodeGetattrer)((*imageNode)(nil))
	_ = (fusefs.NodeOpener)((*imageNode)(nil))
	_ = (fusefs.NodeReader)((*imageNode)(nil))
	_ = (fusefs.NodeWriter)((*imageNode)(nil))
	_ = (fusefs.NodeFsyncer)((*imageNode)(nil))
	_ = (fusefs.NodeFlusher)((*imageNode)(nil))
	_ = (fusefs.NodeSetattrer)((*imageNode)(nil))
)

func (n *imageNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o644
	out.Size = uint64(n.size)
	out.Blksize = n.m.f.Overlay().Header.ChunkSize
	out.Blocks = (out.Size + 511) / 512
	return 0
}

// Open keeps the page cache across opens: only this mount changes the
// image, and every change passes through the kernel. No file handle is
// returned, so the kernel never gets a passthrough fd for data that may not
// have arrived.
func (n *imageNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// Setattr accepts only what leaves the image's size as it is.
func (n *imageNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size {
		return syscall.EPERM
	}
	return n.Getattr(ctx, fh, out)
}

func (n *imageNode) chunk(i uint32) overlay.ChunkID { return overlay.ChunkID{Image: n.img, Index: i} }

func (n *imageNode) Read(ctx context.Context, fh fusefs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= n.size {
		return fuse.ReadResultData(nil), 0
	}
	end := min(off+int64(len(dest)), n.size)
	t := n.m.rec.since()
	start := time.Now()
	if err := n.m.f.ReadAt(ctx, n.img, dest[:end-off], off); err != nil {
		n.m.log.Error().Err(err).Str("image", n.img.String()).Int64("offset", off).Int("length", len(dest)).Msg("read failed: EIO")
		return nil, syscall.EIO
	}
	cs := int64(n.m.f.Overlay().Header.ChunkSize)
	n.m.rec.touch(n.img, "read", off, int(end-off), uint32(off/cs), uint32((end-1)/cs), t, time.Since(start).Seconds())
	return fuse.ReadResultData(dest[:end-off]), 0
}

// Write stores whole new versions of the chunks it touches. A partial chunk
// is read first (which may fetch it) and merged.
func (n *imageNode) Write(ctx context.Context, fh fusefs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off >= n.size || off < 0 {
		return 0, syscall.ENOSPC
	}
	end := min(off+int64(len(data)), n.size)
	cs := int64(n.m.f.Overlay().Header.ChunkSize)
	buf := make([]byte, cs)
	for pos := off; pos < end; {
		idx := pos / cs
		start := idx * cs
		clen := min(cs, n.size-start)
		chunk := buf[:clen]
		mu := &n.locks[idx%int64(len(n.locks))]
		mu.Lock()
		if pos != start || end < start+clen {
			if err := n.m.f.ReadAt(ctx, n.img, chunk, start); err != nil {
				mu.Unlock()
				n.m.log.Error().Err(err).Str("image", n.img.String()).Int64("offset", off).Msg("write: reading the chunk to merge into failed: EIO")
				return n.written(off, pos)
			}
		}
		m := copy(chunk[pos-start:], data[pos-off:end-off])
		err := n.m.f.WriteChunk(n.chunk(uint32(idx)), chunk)
		mu.Unlock()
		if err != nil {
			n.m.log.Error().Err(err).Str("image", n.img.String()).Int64("offset", off).Msg("write failed: EIO")
			return n.written(off, pos)
		}
		pos += int64(m)
	}
	n.m.rec.touch(n.img, "write", off, int(end-off), uint32(off/cs), uint32((end-1)/cs), n.m.rec.since(), 0)
	return uint32(end - off), 0
}

// written is the reply to a write that failed at pos: the bytes stored
// before it, or EIO if there were none.
func (n *imageNode) written(off, pos int64) (uint32, syscall.Errno) {
	if pos > off {
		return uint32(pos - off), 0
	}
	return 0, syscall.EIO
}

func (n *imageNode) Fsync(ctx context.Context, fh fusefs.FileHandle, flags uint32) syscall.Errno {
	if err := n.m.f.Sync(); err != nil {
		n.m.log.Error().Err(err).Msg("fsync failed")
		return syscall.EIO
	}
	return 0
}

func (n *imageNode) Flush(ctx context.Context, fh fusefs.FileHandle) syscall.Errno { return 0 }

// statsNode is the stats file: a fresh JSON document at every open.
type statsNode struct {
	fusefs.Inode
	m *Mount
}

var (
	_ = (fusefs.NodeOpener)((*statsNode)(nil))
	_ = (fusefs.NodeGetattrer)((*statsNode)(nil))
)

func (n *statsNode) snapshot() []byte {
	b, err := json.MarshalIndent(n.m.f.Stats(), "", "  ")
	if err != nil {
		return []byte(fmt.Sprintf("{\"error\": %q}\n", err))
	}
	return append(b, '\n')
}

func (n *statsNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o444
	out.Size = uint64(len(n.snapshot()))
	out.SetTimeout(0)
	return 0
}

func (n *statsNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return &bytesHandle{data: n.snapshot()}, fuse.FOPEN_DIRECT_IO, 0
}

// bytesHandle serves a snapshot taken at open.
type bytesHandle struct{ data []byte }

var _ = (fusefs.FileReader)((*bytesHandle)(nil))

func (h *bytesHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(len(h.data)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(h.data[off:min(int64(len(h.data)), off+int64(len(dest)))]), 0
}

// streamNode is one file under streams/: it grows as events happen.
type streamNode struct {
	fusefs.Inode
	log *eventLog
}

var (
	_ = (fusefs.NodeOpener)((*streamNode)(nil))
	_ = (fusefs.NodeGetattrer)((*streamNode)(nil))
	_ = (fusefs.NodeReader)((*streamNode)(nil))
)

func (n *streamNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o444
	out.Size = uint64(n.log.size())
	out.SetTimeout(0)
	return 0
}

func (n *streamNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (n *streamNode) Read(ctx context.Context, fh fusefs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return fuse.ReadResultData(dest[:n.log.readAt(dest, off)]), 0
}

// MemoryBound is the resident memory a mount of an overlay with header h
// stays under, whatever is read: a fixed part for the program, the store
// and buffers, and per chunk of the images the manifest's reference, the
// fetcher's and recorder's per-chunk state, and the chunk's entry in the
// access trace once it is touched. docs/BENCHMARKS.md has the figures it
// was set from.
func MemoryBound(h *overlay.Header) int64 {
	chunks := h.Chunks(overlay.Disk) + h.Chunks(overlay.Memory)
	return 96<<20 + 96*int64(chunks)
}
