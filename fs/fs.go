// Package fs is the cloudletfs file system: the go-fuse tree that presents a
// mounted overlay as disk/image, memory/image, state, vm.json, stats and
// streams/. Image reads take each chunk from written data, the base, the
// cache or a fetch, all through package fetch; writes are copy-on-write into
// the store. It fetches nothing itself.
package fs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	fusefs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// Options configure a mount.
type Options struct {
	Log        zerolog.Logger
	AllowOther bool // let users other than the mounting one in
	Debug      bool // log every FUSE request
	// NoDiscard refuses fallocate with EOPNOTSUPP, as before the images
	// took discards: a capture that keeps what the guest freed, to
	// compare against.
	NoDiscard bool
}

// Mount is a mounted overlay.
type Mount struct {
	Dir    string
	server *fuse.Server
	f      *fetch.Fetcher
	rec    *recorder
	log    zerolog.Logger
	born   time.Time // the times of everything that never changes

	noDiscard bool // Options.NoDiscard
}

// New mounts the overlay that f serves at dir and returns once the kernel
// has the mount, which is the moment a VM can start.
func New(dir string, f *fetch.Fetcher, opt Options) (*Mount, error) {
	m := &Mount{Dir: dir, f: f, rec: newRecorder(f.Overlay().Header), log: opt.Log, born: time.Now(), noDiscard: opt.NoDiscard}
	f.Observe(m.rec.arrived)
	root := &dirNode{m: m}
	sec := time.Second
	server, err := fusefs.Mount(dir, root, &fusefs.Options{
		// No AttrTimeout: go-fuse would put it in place of every zero,
		// and the files that change on their own (stats, streams/*)
		// need zero; each node sets its own (attrTimeout or zero).
		EntryTimeout: &sec,
		MountOptions: fuse.MountOptions{
			FsName:        "cloudletfs",
			Name:          "cloudletfs",
			AllowOther:    opt.AllowOther,
			DisableXAttrs: true,
			DirectMount:   !strings.HasPrefix(dir, "/dev/fd/"), // else a device the caller mounted itself
			MaxReadAhead:  128 << 10,
			// A guest's large requests arrive whole (1 MiB, the kernel's
			// limit), not as eight round trips of go-fuse's 128 KiB.
			MaxWrite: 1 << 20,
			Debug:    opt.Debug,
			// The images change only through this mount, so the kernel's
			// page cache is never stale; left to itself, the kernel would
			// drop an image's whole page cache (and unmap it under QEMU)
			// each time its mtime moves after a write.
			ExplicitDataCacheControl: true,
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
		dir := add(root, img.String(), &dirNode{m: m}, syscall.S_IFDIR)
		n := &imageNode{m: m, img: img, size: o.Header.ImageSize(img)}
		n.mtime.Store(m.born.UnixNano())
		n.ctime.Store(m.born.UnixNano())
		add(dir, "image", n, syscall.S_IFREG)
	}
	add(root, "state", &constNode{m: m, data: o.State}, syscall.S_IFREG)
	if o.VMConfig != nil {
		add(root, "vm.json", &constNode{m: m, data: o.VMConfig}, syscall.S_IFREG)
	}
	add(root, "stats", &statsNode{m: m}, syscall.S_IFREG)
	streams := add(root, "streams", &dirNode{m: m}, syscall.S_IFDIR)
	for name, l := range map[string]*eventLog{
		"chunks_accessed": &m.rec.accessed, "chunks_fetched": &m.rec.fetched,
		"chunks_modified": &m.rec.modifiedLog, "chunks_discarded": &m.rec.discardedLog,
		"io": &m.rec.io,
	} {
		add(streams, name, &streamNode{m: m, log: l}, syscall.S_IFREG)
	}
}

// The tree is fixed: its names, its directories and every file but the
// images' bytes. go-fuse lets an unlink or rmdir through when the parent
// does not implement it (it drops the child and answers OK), and the kernel
// checks no mode bits without default_permissions (nor any for root), so
// each node refuses every change itself: the directories any change to
// their entries, the read-only files a write open or a setattr, the images
// a change of size, mode or owner.

// errnoOf maps an error from fetch or the store to what the caller of the
// system call sees: a full or read-only state dir as itself, a request the
// kernel interrupted (go-fuse cancels its context on FUSE_INTERRUPT) as
// EINTR, anything else as EIO. A context.Canceled that did not come from
// the request's own context (the mount shutting down) stays EIO.
func errnoOf(ctx context.Context, err error) syscall.Errno {
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return syscall.ENOSPC
	case errors.Is(err, syscall.EROFS):
		return syscall.EROFS
	case errors.Is(err, context.Canceled) && ctx.Err() != nil:
		return syscall.EINTR
	}
	return syscall.EIO
}

// logFailure starts the log line of a failed request: at debug level if the
// caller gave up on it, or if the state dir is full or read-only (such a
// dir fails every write until it is fixed, and the store says so in one
// line when it happens and one when it is over), else at error level.
func (m *Mount) logFailure(errno syscall.Errno, err error) *zerolog.Event {
	switch errno {
	case syscall.EINTR:
		return m.log.Debug().Err(err)
	case syscall.ENOSPC, syscall.EROFS:
		return m.log.Debug().Err(err)
	}
	return m.log.Error().Err(err)
}

// readOnly refuses an open for writing. (O_TRUNC never reaches Open: the
// kernel truncates through Setattr.)
func readOnly(flags uint32) syscall.Errno {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return syscall.EPERM
	}
	return 0
}

// attrTimeout is how long the kernel keeps the attributes of what changes
// only through it (directories, state, vm.json, the images, whose writes
// the kernel sees). stats and streams/* change on their own: the kernel
// keeps theirs not at all.
const attrTimeout = time.Second

// fileAttr fills what every regular file shows: one link, atime the mount's
// start (the kernel does not update it: FUSE mounts are noatime), and
// attrTimeout.
func (m *Mount) fileAttr(out *fuse.AttrOut, mode uint32, size uint64, mtime, ctime time.Time) {
	out.Mode = mode
	out.Nlink = 1
	out.Size = size
	out.SetTimes(&m.born, &mtime, &ctime)
	out.SetTimeout(attrTimeout)
}

// dirNode is the root, disk/, memory/ or streams/.
type dirNode struct {
	fusefs.Inode
	m *Mount
}

var (
	_ = (fusefs.NodeGetattrer)((*dirNode)(nil))
	_ = (fusefs.NodeLookuper)((*dirNode)(nil))
	_ = (fusefs.NodeSetattrer)((*dirNode)(nil))
	_ = (fusefs.NodeUnlinker)((*dirNode)(nil))
	_ = (fusefs.NodeRmdirer)((*dirNode)(nil))
	_ = (fusefs.NodeRenamer)((*dirNode)(nil))
	_ = (fusefs.NodeCreater)((*dirNode)(nil))
	_ = (fusefs.NodeMkdirer)((*dirNode)(nil))
	_ = (fusefs.NodeMknoder)((*dirNode)(nil))
	_ = (fusefs.NodeLinker)((*dirNode)(nil))
	_ = (fusefs.NodeSymlinker)((*dirNode)(nil))
)

func (n *dirNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = 0o555
	out.Nlink = 2 // its name in the parent, and its own "."
	for _, c := range n.Children() {
		if c.IsDir() {
			out.Nlink++ // each subdirectory's ".."
		}
	}
	out.SetTimes(&n.m.born, &n.m.born, &n.m.born)
	out.SetTimeout(attrTimeout)
	return 0
}

// Lookup answers with the child's attributes and how long they hold, which
// go-fuse's own lookup leaves out.
func (n *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	child := n.GetChild(name)
	if child == nil {
		return nil, syscall.ENOENT
	}
	if ga, ok := child.Operations().(fusefs.NodeGetattrer); ok {
		var a fuse.AttrOut
		if errno := ga.Getattr(ctx, nil, &a); errno != 0 {
			return nil, errno
		}
		out.Attr = a.Attr
		out.SetAttrTimeout(a.Timeout())
	}
	return child, 0
}

func (n *dirNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

func (n *dirNode) Unlink(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }
func (n *dirNode) Rmdir(ctx context.Context, name string) syscall.Errno  { return syscall.EPERM }

func (n *dirNode) Rename(ctx context.Context, name string, newParent fusefs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return syscall.EPERM
}

func (n *dirNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fusefs.Inode, fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EPERM
}

func (n *dirNode) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (n *dirNode) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (n *dirNode) Link(ctx context.Context, target fusefs.InodeEmbedder, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

func (n *dirNode) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fusefs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

// constNode is state or vm.json: bytes fixed for the life of the mount.
type constNode struct {
	fusefs.Inode
	m    *Mount
	data []byte
}

var (
	_ = (fusefs.NodeGetattrer)((*constNode)(nil))
	_ = (fusefs.NodeSetattrer)((*constNode)(nil))
	_ = (fusefs.NodeOpener)((*constNode)(nil))
	_ = (fusefs.NodeReader)((*constNode)(nil))
)

func (n *constNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.fileAttr(out, 0o444, uint64(len(n.data)), n.m.born, n.m.born)
	return 0
}

func (n *constNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

func (n *constNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_KEEP_CACHE, readOnly(flags)
}

func (n *constNode) Read(ctx context.Context, fh fusefs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(len(n.data)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(n.data[off:min(int64(len(n.data)), off+int64(len(dest)))]), 0
}

// imageNode is disk/image or memory/image. Its size is the image's, fixed;
// its mtime and ctime move with every write and every explicit change of
// mtime, and otherwise stay at the mount's start.
type imageNode struct {
	fusefs.Inode
	m            *Mount
	img          overlay.Image
	size         int64
	mtime, ctime atomic.Int64 // unix nanoseconds

	// locks serialize read-modify-write of a chunk by concurrent writers.
	locks [chunkLocks]sync.Mutex
}

var (
	_ = (fusefs.NodeGetattrer)((*imageNode)(nil))
	_ = (fusefs.NodeOpener)((*imageNode)(nil))
	_ = (fusefs.NodeReader)((*imageNode)(nil))
	_ = (fusefs.NodeWriter)((*imageNode)(nil))
	_ = (fusefs.NodeFsyncer)((*imageNode)(nil))
	_ = (fusefs.NodeAllocater)((*imageNode)(nil))
	_ = (fusefs.NodeFlusher)((*imageNode)(nil))
	_ = (fusefs.NodeSetattrer)((*imageNode)(nil))
)

func (n *imageNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.fileAttr(out, 0o644, uint64(n.size), time.Unix(0, n.mtime.Load()), time.Unix(0, n.ctime.Load()))
	cs := n.m.f.Overlay().Header.ChunkSize
	out.Blksize = cs
	// What the image really holds, so du tells a discarded or zero image
	// from a full one; the last chunk may be short, hence the cap.
	out.Blocks = min(uint64(n.m.f.Held(n.img))*uint64(cs)/512, (out.Size+511)/512)
	return 0
}

// Open keeps the page cache across opens: only this mount changes the
// image, and every change passes through the kernel. No file handle is
// returned, so the kernel never gets a passthrough fd for data that may not
// have arrived.
func (n *imageNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// Setattr accepts a truncate to the size the image has and a new mtime
// (touch); a change of size, mode or owner is refused.
func (n *imageNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size {
		return syscall.EPERM
	}
	_, mode := in.GetMode()
	_, uid := in.GetUID()
	_, gid := in.GetGID()
	if mode || uid || gid {
		return syscall.EPERM
	}
	now := time.Now()
	if in.Valid&fuse.FATTR_MTIME != 0 {
		mt := now
		if in.Valid&fuse.FATTR_MTIME_NOW == 0 {
			mt, _ = in.GetMTime()
		}
		n.mtime.Store(mt.UnixNano())
		n.ctime.Store(now.UnixNano())
	}
	return n.Getattr(ctx, fh, out)
}

// modified moves mtime and ctime to now, after a write.
func (n *imageNode) modified() {
	now := time.Now().UnixNano()
	n.mtime.Store(now)
	n.ctime.Store(now)
}

func (n *imageNode) chunk(i uint32) overlay.ChunkID { return overlay.ChunkID{Image: n.img, Index: i} }

func (n *imageNode) Read(ctx context.Context, fh fusefs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= n.size {
		return fuse.ReadResultData(nil), 0
	}
	end := min(off+int64(len(dest)), n.size)
	t := n.m.rec.since()
	start := time.Now()
	if err := n.m.f.ReadAt(withCaller(ctx), n.img, dest[:end-off], off); err != nil {
		errno := errnoOf(ctx, err)
		n.m.logFailure(errno, err).Str("image", n.img.String()).Int64("offset", off).Int("length", len(dest)).Msgf("read failed: %s", errnoName(errno))
		return nil, errno
	}
	cs := int64(n.m.f.Overlay().Header.ChunkSize)
	n.m.rec.touch(n.img, "read", off, int(end-off), uint32(off/cs), uint32((end-1)/cs), t, time.Since(start).Seconds())
	return fuse.ReadResultData(dest[:end-off]), 0
}

// withCaller tells the fetcher which process a read is for.
func withCaller(ctx context.Context) context.Context {
	if c, ok := fuse.FromContext(ctx); ok {
		return fetch.WithCaller(ctx, c.Pid)
	}
	return ctx
}

// Write stores the bytes in the store's written-data file, in one write.
// A chunk it covers only in part that holds no written bytes yet is read
// first (which may fetch it) and merged, so the store never holds part of
// a chunk; a chunk written before takes the bytes as they are. The image
// cannot grow: a write that starts at or past its end fails with EFBIG,
// and one that runs over the end stores the bytes up to it and returns
// their count (the kernel then asks for the rest, and reports the EFBIG).
func (n *imageNode) Write(ctx context.Context, fh fusefs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= n.size {
		return 0, syscall.EFBIG
	}
	end := min(off+int64(len(data)), n.size)
	data = data[:end-off]
	cs := int64(n.m.f.Overlay().Header.ChunkSize)
	first, last := off/cs, (end-1)/cs
	defer n.lockChunks(first, last)()
	headEnd, tailStart, tailEnd := min((first+1)*cs, n.size), last*cs, min((last+1)*cs, n.size)
	head := off != first*cs && !n.m.f.Written(n.chunk(uint32(first)))
	tail := end != tailEnd && !n.m.f.Written(n.chunk(uint32(last)))
	from := off
	if head || tail {
		to := end
		if head {
			from = first * cs
		}
		if tail {
			to = tailEnd
		}
		buf := make([]byte, to-from)
		var err error
		if head {
			err = n.m.f.ReadAt(withCaller(ctx), n.img, buf[:headEnd-from], from)
		}
		if tail && err == nil && (!head || last != first) {
			err = n.m.f.ReadAt(withCaller(ctx), n.img, buf[tailStart-from:], tailStart)
		}
		if err != nil {
			errno := errnoOf(ctx, err)
			n.m.logFailure(errno, err).Str("image", n.img.String()).Int64("offset", off).Msgf("write: reading the chunk to merge into failed: %s", errnoName(errno))
			return 0, errno
		}
		copy(buf[off-from:], data)
		data = buf
	}
	if err := n.m.f.WriteCow(n.img, data, from); err != nil {
		errno := errnoOf(ctx, err)
		n.m.logFailure(errno, err).Str("image", n.img.String()).Int64("offset", off).Msgf("write failed: %s", errnoName(errno))
		return 0, errno
	}
	n.modified()
	n.m.rec.touch(n.img, "write", off, int(end-off), uint32(first), uint32(last), n.m.rec.since(), 0)
	return uint32(end - off), 0
}

// chunkLocks is how many locks the chunks of an image share, by index.
const chunkLocks = 64

// lockChunks takes the locks of chunks first..last and returns what lets
// them go. Every holder of more than one lock takes them in the order of
// the array, so two never wait on each other.
func (n *imageNode) lockChunks(first, last int64) func() {
	var stripes [len(n.locks)]bool
	for i := first; i <= last && i < first+int64(len(n.locks)); i++ {
		stripes[i%int64(len(n.locks))] = true
	}
	return n.lockStripes(&stripes)
}

func (n *imageNode) lockStripes(stripes *[chunkLocks]bool) func() {
	for i, on := range stripes {
		if on {
			n.locks[i].Lock()
		}
	}
	return func() {
		for i, on := range stripes {
			if on {
				n.locks[i].Unlock()
			}
		}
	}
}

// The fallocate modes an image accepts: both discard a range, which then
// reads as zeros, and neither changes the size.
const (
	punchHole = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	zeroRange = unix.FALLOC_FL_ZERO_RANGE
)

// Allocate discards a range, for a VMM that passes on the guest's TRIM or
// freed pages. Whole chunks in it become discarded chunks, a marker in the
// store; the covered bytes of a chunk at either edge are zeroed through
// Write's read-modify-write. A chunk that reads as zeros already is left
// as it is: a guest reports the same free pages again and again. The image
// neither grows nor shrinks: a range past its end is cut at the end when
// KEEP_SIZE is set, and otherwise fails with EFBIG, as a write past the
// end does. Any other mode, a plain preallocation included, gets
// EOPNOTSUPP, and so does every mode on a mount with NoDiscard.
func (n *imageNode) Allocate(ctx context.Context, fh fusefs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if n.m.noDiscard || mode != punchHole && mode != zeroRange && mode != zeroRange|unix.FALLOC_FL_KEEP_SIZE {
		return syscall.EOPNOTSUPP
	}
	if size == 0 || off > math.MaxInt64 || size > math.MaxInt64-off {
		return syscall.EINVAL
	}
	end := int64(off + size)
	if end > n.size {
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return syscall.EFBIG
		}
		end = n.size
	}
	start := int64(off)
	if start >= end {
		return 0
	}
	cs := int64(n.m.f.Overlay().Header.ChunkSize)
	var zeros []byte
	var whole []uint32
	for pos := start; pos < end; {
		idx := pos / cs
		cstart := idx * cs
		cend := min(cstart+cs, n.size)
		if n.m.f.AllZero(n.chunk(uint32(idx))) {
			pos = min(end, cend)
			continue
		}
		if pos == cstart && end >= cend {
			whole = append(whole, uint32(idx))
			if len(whole) == maxDiscardBatch {
				if errno := n.discard(ctx, whole); errno != 0 {
					return errno
				}
				whole = whole[:0]
			}
			pos = cend
			continue
		}
		l := min(end, cend) - pos
		if int64(len(zeros)) < l {
			zeros = make([]byte, cs)
		}
		// Write zeroes a part of a chunk as it stores any other bytes.
		if w, errno := n.Write(ctx, fh, zeros[:l], pos); errno != 0 {
			return errno
		} else if int64(w) != l {
			return syscall.EIO
		}
		pos += l
	}
	return n.discard(ctx, whole)
}

// maxDiscardBatch bounds the chunks discarded in one write to the store
// (64 MiB of 4 KiB chunks), and so how long writers wait on the chunk locks.
const maxDiscardBatch = 16384

// discard records whole chunks as discarded, all in one write to the
// store: a VMM discards megabytes at a time, and a write per chunk made
// that cost milliseconds per megabyte. It holds the locks of all of them
// meanwhile, taken in the order of the array, as any other holder of more
// than one does.
func (n *imageNode) discard(ctx context.Context, idxs []uint32) syscall.Errno {
	if len(idxs) == 0 {
		return 0
	}
	var stripes [len(n.locks)]bool
	ids := make([]overlay.ChunkID, len(idxs))
	for i, idx := range idxs {
		stripes[idx%uint32(len(n.locks))] = true
		ids[i] = n.chunk(idx)
	}
	unlock := n.lockStripes(&stripes)
	err := n.m.f.DiscardChunks(ids)
	unlock()
	if err != nil {
		errno := errnoOf(ctx, err)
		n.m.logFailure(errno, err).Str("image", n.img.String()).Int64("offset", int64(idxs[0])*int64(n.m.f.Overlay().Header.ChunkSize)).Int("chunks", len(idxs)).Msgf("discard failed: %s", errnoName(errno))
		return errno
	}
	for _, idx := range idxs {
		n.m.rec.discarded(n.img, idx)
	}
	n.modified()
	return 0
}

func (n *imageNode) Fsync(ctx context.Context, fh fusefs.FileHandle, flags uint32) syscall.Errno {
	if err := n.m.f.Sync(); err != nil {
		errno := errnoOf(ctx, err)
		n.m.logFailure(errno, err).Msgf("fsync failed: %s", errnoName(errno))
		return errno
	}
	return 0
}

func (n *imageNode) Flush(ctx context.Context, fh fusefs.FileHandle) syscall.Errno { return 0 }

// errnoName is the errno's symbol, as in the C headers, for the log.
func errnoName(e syscall.Errno) string {
	switch e {
	case syscall.ENOSPC:
		return "ENOSPC"
	case syscall.EROFS:
		return "EROFS"
	case syscall.EINTR:
		return "EINTR"
	}
	return "EIO"
}

// statsNode is the stats file: a fresh JSON document at every open, so its
// mtime is always now.
type statsNode struct {
	fusefs.Inode
	m *Mount
}

var (
	_ = (fusefs.NodeOpener)((*statsNode)(nil))
	_ = (fusefs.NodeGetattrer)((*statsNode)(nil))
	_ = (fusefs.NodeSetattrer)((*statsNode)(nil))
)

func (n *statsNode) snapshot() []byte {
	b, err := json.MarshalIndent(n.m.f.Stats(), "", "  ")
	if err != nil {
		return []byte(fmt.Sprintf("{\"error\": %q}\n", err))
	}
	return append(b, '\n')
}

func (n *statsNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	now := time.Now()
	n.m.fileAttr(out, 0o444, uint64(len(n.snapshot())), now, now)
	out.SetTimeout(0)
	return 0
}

func (n *statsNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

func (n *statsNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnly(flags); errno != 0 {
		return nil, 0, errno
	}
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

// streamNode is one file under streams/: it grows as events happen, and
// each open follows it on its own (see follower).
type streamNode struct {
	fusefs.Inode
	m   *Mount
	log *eventLog
}

var (
	_ = (fusefs.NodeOpener)((*streamNode)(nil))
	_ = (fusefs.NodeGetattrer)((*streamNode)(nil))
	_ = (fusefs.NodeSetattrer)((*streamNode)(nil))
)

func (n *streamNode) Getattr(ctx context.Context, fh fusefs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	size, last := n.log.stat()
	mtime := n.m.born
	if !last.IsZero() {
		mtime = last
	}
	n.m.fileAttr(out, 0o444, uint64(size), mtime, mtime)
	out.SetTimeout(0)
	return 0
}

func (n *streamNode) Setattr(ctx context.Context, fh fusefs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return syscall.EPERM
}

func (n *streamNode) Open(ctx context.Context, flags uint32) (fusefs.FileHandle, uint32, syscall.Errno) {
	if errno := readOnly(flags); errno != 0 {
		return nil, 0, errno
	}
	return &follower{log: n.log}, fuse.FOPEN_DIRECT_IO, 0
}

// MemoryBound is the resident memory a mount of an overlay with header h
// stays under, whatever is read: a fixed part for the program, the store
// and buffers, the segments the fetcher keeps in memory while the cache
// cannot store them (fetch.MemCacheBytes), and per chunk of the images
// the manifest's reference, the fetcher's and recorder's per-chunk
// state, and the chunk's entry in the access trace once it is touched.
// docs/BENCHMARKS.md has the figures it was set from.
func MemoryBound(h *overlay.Header) int64 {
	chunks := h.Chunks(overlay.Disk) + h.Chunks(overlay.Memory)
	return 96<<20 + fetch.MemCacheBytes + 96*int64(chunks)
}
