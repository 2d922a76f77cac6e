package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// view is one image of an overlay read back as plain bytes: chunks from the
// base, zero, or the decoded data that Unpack spilled to a file.
type view struct {
	o    *Overlay
	base *Base
	img  Image
	data *os.File
	offs []int64 // per stream position, offset of the chunk in data
}

func (v *view) ReadAt(p []byte, off int64) (int, error) {
	h := v.o.Header
	cs := int64(h.ChunkSize)
	size := h.ImageSize(v.img)
	if off >= size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), size)
	chunk := make([]byte, cs)
	for pos := off; pos < end; {
		idx := pos / cs
		start := idx * cs
		c := chunk[:h.ChunkLen(ChunkID{v.img, uint32(idx)})]
		r := v.o.Manifest.Refs[v.img][idx]
		switch r.Kind {
		case Zero:
			clear(c)
		case BaseDisk, BaseMemory:
			n, err := v.base.Images[r.Kind-BaseDisk].ReadAt(c, int64(r.Index)*cs)
			if n < len(c) && err != nil && err != io.EOF {
				return 0, err
			}
			clear(c[n:])
		case Self, Data:
			target := ChunkID{v.img, uint32(idx)}
			if r.Kind == Self {
				target = ChunkID{r.Image, r.Index}
				r = v.o.Manifest.Refs[r.Image][r.Index]
			}
			n := h.ChunkLen(target)
			clear(c)
			if _, err := v.data.ReadAt(c[:min(n, int64(len(c)))], v.offs[r.Index]); err != nil {
				return 0, err
			}
		}
		k := copy(p[pos-off:end-off], c[pos-start:])
		pos += int64(k)
	}
	if end-off < int64(len(p)) {
		return int(end - off), io.EOF
	}
	return len(p), nil
}

// Unpack decodes every segment of o once into a temporary file in dir and
// returns the custom VM as an Input for Build: the same bytes Extract would
// write, without writing the images. Call the returned function to remove
// the temporary file. A segment that cannot be read fails it with a
// *SourceError; a done ctx stops it.
func (o *Overlay) Unpack(ctx context.Context, base *Base, dir string, workers int) (*Input, func(), error) {
	if o.Header.Layered() {
		return nil, nil, errLayered
	}
	if err := o.CheckBase(base); err != nil {
		return nil, nil, err
	}
	f, err := os.CreateTemp(dir, ".unpack-*")
	if err != nil {
		return nil, nil, err
	}
	cleanup := func() { f.Close(); os.Remove(f.Name()) }
	offs := make([]int64, len(o.Manifest.Order))
	segOff := make([]int64, len(o.Manifest.Segments))
	var off int64
	for i, s := range o.Manifest.Segments {
		segOff[i] = off
		for j, c := range o.Manifest.Order[s.First : s.First+s.Count] {
			offs[s.First+j] = off
			off += o.Header.ChunkLen(c)
		}
	}
	err = o.eachSegment(workers, func(i int) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		raw, err := o.ReadSegment(i)
		if err != nil {
			return &SourceError{err}
		}
		_, err = f.WriteAt(raw, segOff[i])
		return err
	})
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	in := &Input{
		Sizes:    [2]int64{o.Header.ImageSize(Disk), o.Header.ImageSize(Memory)},
		State:    o.State,
		VMConfig: o.VMConfig,
	}
	for _, img := range Images {
		in.Images[img] = &view{o: o, base: base, img: img, data: f, offs: offs}
	}
	return in, cleanup, nil
}

// SourceError is a failure to read the overlay Reorder was given, as
// opposed to one writing the new overlay: the caller names the input file.
type SourceError struct{ Err error }

func (e *SourceError) Error() string { return e.Err.Error() }
func (e *SourceError) Unwrap() error { return e.Err }

// errLayered refuses to rewrite a layered overlay: its parent's chunks
// would have to be written into it.
var errLayered = errors.New("a layered overlay cannot be rewritten: extract it (with its parents) and build it again with `overlay create`, with --parent to keep it layered")

// Reorder writes o again to out with a new stream order and segmentation:
// the chunks in first come first, in that order; the rest keep the order
// they had in o. The VM it describes is the same, byte for byte, and it
// needs nothing but o and its base. A segment of o that cannot be read or
// is corrupt fails it with a *SourceError. It decodes o into a scratch
// directory beside out, removed on every return.
func Reorder(out string, o *Overlay, base *Base, first []ChunkID, opt BuildOptions) (*Summary, error) {
	sum, err := reorder(out, o, base, first, opt)
	return sum, hideTemp(err)
}

func reorder(out string, o *Overlay, base *Base, first []ChunkID, opt BuildOptions) (sum *Summary, err error) {
	if o.Header.Layered() {
		return nil, errLayered
	}
	for _, c := range first {
		if int(c.Index) >= o.Header.Chunks(c.Image) {
			return nil, fmt.Errorf("order names %s, beyond the image's %d chunks", c, o.Header.Chunks(c.Image))
		}
	}
	if opt.Context == nil {
		opt.Context = context.Background()
	}
	undo, err := mkdirs(filepath.Dir(out))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			undo()
		}
	}()
	dir, err := os.MkdirTemp(filepath.Dir(out), scratchMark+"*")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	in, cleanup, err := o.Unpack(opt.Context, base, dir, opt.Workers)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	opt.Order = append(append([]ChunkID(nil), first...), o.Manifest.Order...)
	return buildOverlay(out, base, in, opt)
}
