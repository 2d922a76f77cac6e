package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
)

// Names of the files Extract writes.
const (
	DiskFile     = "disk.img"
	MemoryFile   = "memory.img"
	StateFile    = "state"
	VMConfigFile = "vm.json"
)

// CheckBase reports whether base is the one o was built against and can
// supply every chunk o takes from it.
func (o *Overlay) CheckBase(base *Base) error {
	if o.Header.BaseID != base.ID {
		return fmt.Errorf("overlay was built against base %s, not %s", o.Header.BaseID.Short(), base.ID.Short())
	}
	if int(o.Header.ChunkSize) != base.Index.ChunkSize {
		return fmt.Errorf("overlay chunk size %d differs from the base's %d", o.Header.ChunkSize, base.Index.ChunkSize)
	}
	cs := int64(base.Index.ChunkSize)
	chunks := [2]int64{(base.Index.Sizes[Disk] + cs - 1) / cs, (base.Index.Sizes[Memory] + cs - 1) / cs}
	for _, img := range Images {
		for i, r := range o.Manifest.Refs[img] {
			if (r.Kind == BaseDisk || r.Kind == BaseMemory) && int64(r.Index) >= chunks[r.Kind-BaseDisk] {
				return fmt.Errorf("manifest: %s chunk %d refers to %s chunk %d, beyond the base image", img, i, r.Kind, r.Index)
			}
		}
	}
	return nil
}

// Extract writes the custom VM an overlay describes into dir: disk.img,
// memory.img, state and, when present, vm.json. An older vm.json in dir is
// removed when the overlay carries none, so that dir holds this VM and no
// part of another. Every file is written beside its final name and renamed
// into place only after all of them are complete; on failure nothing is
// left behind, not even dir or the parents of it that Extract created.
func Extract(o *Overlay, base *Base, dir string, workers int, progress func(n, total int64)) error {
	return ExtractContext(context.Background(), o, base, dir, workers, progress)
}

// ExtractContext is Extract that a done ctx interrupts, leaving nothing
// behind.
func ExtractContext(ctx context.Context, o *Overlay, base *Base, dir string, workers int, progress func(n, total int64)) error {
	return hideTemp(extract(ctx, o, base, dir, workers, progress))
}

func extract(ctx context.Context, o *Overlay, base *Base, dir string, workers int, progress func(n, total int64)) (err error) {
	if err := o.CheckBase(base); err != nil {
		return err
	}
	if o.Header.Layered() && (o.parent[Disk] == nil || o.parent[Memory] == nil) {
		return fmt.Errorf("overlay %s is layered on overlay %s (%s): its parent must be resolved first", o.ID.Short(), o.Manifest.Parent.ID.Short(), o.Manifest.Parent.Location)
	}
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	undo, err := mkdirs(dir)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			undo()
		}
	}()
	src := &Base{ID: base.ID, Index: base.Index}
	for i, img := range base.Images {
		src.Images[i] = ctxReaderAt{ctx, img}
	}

	names := []string{DiskFile, MemoryFile, StateFile}
	if o.VMConfig != nil {
		names = append(names, VMConfigFile)
	}
	files := make([]*os.File, len(names))
	committed := 0
	defer func() {
		if err != nil {
			for _, f := range files[committed:] {
				if f != nil {
					discard(f)
				}
			}
		}
	}()
	for i, n := range names {
		if files[i], err = tempFile(filepath.Join(dir, n)); err != nil {
			return err
		}
	}
	h := o.Header
	for _, img := range Images {
		if err := files[img].Truncate(h.ImageSize(img)); err != nil {
			return err
		}
	}
	if _, err := files[2].Write(o.State); err != nil {
		return err
	}
	if o.VMConfig != nil {
		if _, err := files[3].Write(o.VMConfig); err != nil {
			return err
		}
	}

	prog := lockedProgress(progress, o.rawTotal())
	out := [2]*os.File{files[Disk], files[Memory]}
	if err := o.eachSegment(workers, func(i int) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := o.writeSegment(out, i); err != nil {
			return err
		}
		if prog != nil {
			prog(int64(o.Manifest.Segments[i].Raw))
		}
		return nil
	}); err != nil {
		return err
	}
	if err := o.writeRefs(out, src); err != nil {
		return err
	}
	// The last moment to stop: from here on, dir changes.
	if err := ctx.Err(); err != nil {
		return err
	}
	for i, f := range files {
		if err := commit(f, filepath.Join(dir, names[i])); err != nil {
			return err
		}
		committed++
	}
	if o.VMConfig == nil {
		if err := os.Remove(filepath.Join(dir, VMConfigFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing the vm.json of an earlier VM: %w", err)
		}
	}
	return syncDir(dir)
}

func (o *Overlay) writeSegment(out [2]*os.File, i int) error {
	raw, err := o.ReadSegment(i)
	if err != nil {
		return err
	}
	s := o.Manifest.Segments[i]
	cs := int64(o.Header.ChunkSize)
	off := int64(0)
	for _, c := range o.Manifest.Order[s.First : s.First+s.Count] {
		n := o.Header.ChunkLen(c)
		if _, err := out[c.Image].WriteAt(raw[off:off+n], int64(c.Index)*cs); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// writeRefs fills the chunks that come from the base or repeat a data chunk.
// Runs of consecutive base chunks are copied in one piece.
func (o *Overlay) writeRefs(out [2]*os.File, base *Base) error {
	h := o.Header
	cs := int64(h.ChunkSize)
	buf := make([]byte, 0, 4<<20)
	for _, img := range Images {
		refs := o.Manifest.Refs[img]
		size := h.ImageSize(img)
		for i := 0; i < len(refs); {
			r := refs[i]
			var src io.ReaderAt
			switch r.Kind {
			case BaseDisk, BaseMemory:
				src = base.Images[r.Kind-BaseDisk]
			case ParentDisk, ParentMemory:
				src = o.parent[r.Kind-ParentDisk]
			case Self:
				src = out[r.Image]
			default:
				i++
				continue
			}
			// Extend the run while the next chunk continues the same source.
			n := 1
			for r.Kind != Self && i+n < len(refs) && (n+1)*int(cs) <= cap(buf) &&
				refs[i+n].Kind == r.Kind && refs[i+n].Index == r.Index+uint32(n) {
				n++
			}
			dst := int64(i) * cs
			length := min(int64(n)*cs, size-dst)
			b := buf[:length]
			// Reading past the end of a base image yields zeros, as the index
			// assumed when it hashed the padded last chunk.
			m, err := src.ReadAt(b, int64(r.Index)*cs)
			if m < len(b) && err != nil && err != io.EOF {
				return fmt.Errorf("reading %s chunk %d for %s chunk %d: %w", r.Kind, r.Index, img, i, err)
			}
			clear(b[m:])
			if _, err := out[img].WriteAt(b, dst); err != nil {
				return err
			}
			i += n
		}
	}
	return nil
}
