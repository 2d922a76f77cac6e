package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// source is where a run of chunks is read from.
type source int

const (
	srcZero   source = iota
	srcBase          // the base image, at the ref's chunk
	srcCache         // the cache file, at the chunk's own offset
	srcCow           // written chunks, in the store's written-data file
	srcMem           // a fetched chunk the cache could not keep, one at a time
	srcParent        // the parent overlay, at the ref's chunk
)

// callerKey is the context key of the thread a read is made for.
type callerKey struct{}

// WithCaller returns ctx carrying pid, the thread a read is made for (the
// FUSE request's Pid is the ID of the calling thread, not its process): a
// read that timed out makes only that thread's repeat of it fail at once
// (see repeatWindow).
func WithCaller(ctx context.Context, pid uint32) context.Context {
	return context.WithValue(ctx, callerKey{}, pid)
}

// callerOf returns the thread set by WithCaller, 0 if none.
func callerOf(ctx context.Context) uint32 {
	pid, _ := ctx.Value(callerKey{}).(uint32)
	return pid
}

// ReadAt fills dest with the bytes of image img at off, which must lie
// within the image: written data first, then zero, the base or the cache,
// fetching the segments of chunks that have not arrived. Runs of chunks
// with the same kind of source are read with one call, so reading
// unchanged or cached parts of an image costs about what a pread does.
func (f *Fetcher) ReadAt(ctx context.Context, img overlay.Image, dest []byte, off int64) error {
	return f.read(ctx, img, dest, off, true)
}

// ReadOriginal is ReadAt of the overlay's own bytes, as if nothing had
// been written through the mount.
func (f *Fetcher) ReadOriginal(ctx context.Context, img overlay.Image, dest []byte, off int64) error {
	return f.read(ctx, img, dest, off, false)
}

func (f *Fetcher) read(ctx context.Context, img overlay.Image, dest []byte, off int64, cow bool) error {
	h := f.o.Header
	cs := int64(h.ChunkSize)
	size := h.ImageSize(img)
	end := off + int64(len(dest))
	if off < 0 || end > size {
		return fmt.Errorf("%s: bytes %d-%d are outside the image", img, off, end)
	}
	if len(dest) == 0 {
		return nil
	}
	mem, err := f.await(ctx, readKey{callerOf(ctx), img, off, end}, off/cs, (end-1)/cs, cow)
	if err != nil {
		return err
	}
	refs := f.o.Manifest.Refs[img]
	for pos := off; pos < end; {
		idx := pos / cs
		src, r := f.sourceOf(img, idx, mem, cow)
		// Extend the run over chunks that continue it.
		n := int64(1)
		for idx+n <= (end-1)/cs {
			s2, r2 := f.sourceOf(img, idx+n, mem, cow)
			if s2 != src || src == srcMem || (src == srcBase || src == srcParent) && (r2.Kind != r.Kind || r2.Index != r.Index+uint32(n)) {
				break
			}
			n++
		}
		runEnd := min((idx+n)*cs, end)
		part := dest[pos-off : runEnd-off]
		skip := pos - idx*cs
		var err error
		switch src {
		case srcZero:
			clear(part)
		case srcBase:
			err = f.readBase(refs[idx], skip, part)
		case srcParent:
			err = f.readParent(ctx, refs[idx], skip, part)
		case srcCache:
			err = f.cache.ReadAt(img, part, pos)
		case srcCow:
			err = f.cache.ReadCow(img, part, pos)
		case srcMem:
			copy(part, mem[int(f.segOf[img][idx])][overlay.ChunkID{Image: img, Index: uint32(idx)}][skip:])
		}
		if err != nil {
			return fmt.Errorf("%s chunk %d: %w", img, idx, err)
		}
		pos = runEnd
	}
	return nil
}

// sourceOf says where chunk idx of img is read from now. Written chunks
// are read from the store's written-data file and discarded ones are
// zeros, known from the state kept in memory: no database lookup. Data
// and self chunks are read from the cache, which await has made sure of,
// or from mem when the cache could not keep their segment.
func (f *Fetcher) sourceOf(img overlay.Image, idx int64, mem map[int]map[overlay.ChunkID][]byte, cow bool) (source, overlay.Ref) {
	if cow {
		switch f.cowOf(overlay.ChunkID{Image: img, Index: uint32(idx)}) {
		case cowData:
			return srcCow, overlay.Ref{}
		case cowZero:
			return srcZero, overlay.Ref{}
		}
	}
	r := f.o.Manifest.Refs[img][idx]
	switch r.Kind {
	case overlay.Zero:
		return srcZero, r
	case overlay.BaseDisk, overlay.BaseMemory:
		return srcBase, r
	case overlay.ParentDisk, overlay.ParentMemory:
		return srcParent, r
	}
	if mem[int(f.segOf[img][idx])] != nil {
		return srcMem, r
	}
	return srcCache, r
}

// await makes sure every segment that chunks first..last of img need has
// arrived, fetching those that have not, all at once. It returns the
// chunks of segments the cache could not keep.
func (f *Fetcher) await(ctx context.Context, rk readKey, first, last int64, cow bool) (map[int]map[overlay.ChunkID][]byte, error) {
	img := rk.img
	var segs []int
	prev := int32(-1)
	for i := first; i <= last; i++ {
		seg := f.segOf[img][i]
		if seg < 0 || seg == prev || cow && f.Modified(overlay.ChunkID{Image: img, Index: uint32(i)}) {
			continue
		}
		prev = seg
		segs = append(segs, int(seg))
	}
	if len(segs) == 0 {
		return nil, nil
	}
	return f.ensure(ctx, rk, segs...)
}

// readBase reads dst from the base at the position of ref plus skip bytes;
// past the end of the base image it reads zeros.
func (f *Fetcher) readBase(r overlay.Ref, skip int64, dst []byte) error {
	n, err := f.base.Images[r.Kind-overlay.BaseDisk].ReadAt(dst, int64(r.Index)*int64(f.o.Header.ChunkSize)+skip)
	if n < len(dst) {
		if err != nil && err != io.EOF {
			return fmt.Errorf("base: %w", err)
		}
		clear(dst[n:])
	}
	return nil
}

// readParent reads dst from the parent at the position of ref plus skip
// bytes; past the end of the parent's image it reads zeros.
func (f *Fetcher) readParent(ctx context.Context, r overlay.Ref, skip int64, dst []byte) error {
	p := f.opt.Parent
	img := overlay.Image(r.Kind - overlay.ParentDisk)
	off := int64(r.Index)*int64(f.o.Header.ChunkSize) + skip
	n := max(min(int64(len(dst)), p.o.Header.ImageSize(img)-off), 0)
	clear(dst[n:])
	if n == 0 {
		return nil
	}
	if err := p.ReadAt(ctx, img, dst[:n], off); err != nil {
		return fmt.Errorf("parent overlay %s: %w", p.o.ID.Short(), err)
	}
	return nil
}

// cowState is where a chunk's bytes are since the mount changed it.
type cowState uint8

const (
	cowNone cowState = iota // not changed: the overlay's ref says
	cowData                 // written: the store holds the whole chunk
	cowZero                 // discarded: the store holds a marker, it reads as zeros
)

// WriteCow stores bytes written at off in img. Every chunk they touch must
// be covered whole, or be written already (Written): the caller merges a
// partial chunk first. Sync makes them durable.
func (f *Fetcher) WriteCow(img overlay.Image, p []byte, off int64) error {
	if err := f.cache.WriteCow(img, p, off); err != nil {
		return err
	}
	cs := int64(f.o.Header.ChunkSize)
	for i := off / cs; i <= (off+int64(len(p))-1)/cs; i++ {
		f.setCow(overlay.ChunkID{Image: img, Index: uint32(i)}, cowData)
	}
	return nil
}

// DiscardChunks makes whole chunks read as zeros, recorded as markers
// rather than as chunks of zeros, in one write to the store; Sync makes
// them durable. When the store discarded only some of them (a
// *store.DiscardError), those read as zeros here too, as they will after
// a remount.
func (f *Fetcher) DiscardChunks(ids []overlay.ChunkID) error {
	err := f.cache.DiscardCows(ids)
	if err != nil {
		var part *store.DiscardError
		if !errors.As(err, &part) {
			return err
		}
		ids = ids[:part.Done]
	}
	for _, id := range ids {
		f.setCow(id, cowZero)
	}
	return err
}

// setCow moves a chunk to state st and keeps held and discarded in step.
func (f *Fetcher) setCow(id overlay.ChunkID, st cowState) {
	holds := func(s cowState) bool {
		return s == cowData || s == cowNone && f.o.Manifest.Refs[id.Image][id.Index].Kind != overlay.Zero
	}
	f.cowMu.Lock()
	old := f.cow[id.Image][id.Index]
	f.cow[id.Image][id.Index] = st
	if holds(old) != holds(st) {
		if holds(st) {
			f.held[id.Image]++
		} else {
			f.held[id.Image]--
		}
	}
	if old == cowZero {
		f.discarded--
	}
	if st == cowZero {
		f.discarded++
	}
	f.cowMu.Unlock()
	f.anyCow.Store(true)
}

// AllZero reports whether a chunk reads as zeros without being read: it
// was discarded, or is a zero chunk of the overlay not written since.
func (f *Fetcher) AllZero(id overlay.ChunkID) bool {
	f.cowMu.RLock()
	defer f.cowMu.RUnlock()
	switch f.cow[id.Image][id.Index] {
	case cowZero:
		return true
	case cowNone:
		return f.o.Manifest.Refs[id.Image][id.Index].Kind == overlay.Zero
	}
	return false
}

// Held returns how many chunks of img hold bytes: not zero in the overlay
// (or written since) and not discarded. It is what the image costs, for
// st_blocks.
func (f *Fetcher) Held(img overlay.Image) int64 {
	f.cowMu.RLock()
	defer f.cowMu.RUnlock()
	return f.held[img]
}

// Modified reports whether a chunk has been written or discarded.
func (f *Fetcher) Modified(id overlay.ChunkID) bool { return f.cowOf(id) != cowNone }

// Written reports whether a chunk holds bytes written through the mount,
// so that a write to part of it needs no merge.
func (f *Fetcher) Written(id overlay.ChunkID) bool { return f.cowOf(id) == cowData }

func (f *Fetcher) cowOf(id overlay.ChunkID) cowState {
	if !f.anyCow.Load() {
		return cowNone
	}
	f.cowMu.RLock()
	defer f.cowMu.RUnlock()
	return f.cow[id.Image][id.Index]
}

// Sync makes every write durable.
func (f *Fetcher) Sync() error { return f.cache.Sync() }

// Base returns the base the overlay is read against.
func (f *Fetcher) Base() *overlay.Base { return f.base }
