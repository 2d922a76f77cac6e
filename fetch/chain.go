package fetch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Layer is one overlay of a chain and where it is read from.
type Layer struct {
	Overlay *overlay.Overlay
	Source  Source
	Ref     string // the URL or path it was opened from
}

// MaxChainDepth bounds a chain of layered overlays.
const MaxChainDepth = 64

// ResolveLocation returns where the parent a layer names at loc is, for a
// layer opened from ref: loc itself when it is a URL, else loc taken
// relative to ref, as a link in a web page is.
func ResolveLocation(ref, loc string) string {
	if strings.Contains(loc, "://") || filepath.IsAbs(loc) && !strings.Contains(ref, "://") {
		return loc
	}
	if strings.Contains(ref, "://") {
		u, err := url.Parse(ref)
		if err == nil {
			if l, err := url.Parse(loc); err == nil {
				return u.ResolveReference(l).String()
			}
		}
		return loc
	}
	return filepath.Join(filepath.Dir(ref), loc)
}

// OpenParents opens the parents of a layered overlay, nearest first, each
// checked against the layer that names it: its ID, its base and chunk size,
// and every chunk the layer takes from it. open opens a source; a parent it
// cannot open or read is "missing", an ID seen twice a cycle. An overlay
// that names no parent has none. The caller closes the sources.
func OpenParents(ctx context.Context, child *overlay.Overlay, ref string, open func(ref string) (Source, error)) (_ []Layer, err error) {
	var chain []Layer
	defer func() {
		if err != nil {
			for _, l := range chain {
				l.Source.Close()
			}
		}
	}()
	seen := map[overlay.Digest]bool{child.ID: true}
	o := child
	for o.Manifest.Parent != nil {
		p := o.Manifest.Parent
		if seen[p.ID] {
			return nil, fmt.Errorf("overlay %s: its chain of parents has a cycle: overlay %s comes twice", Redact(ref), p.ID.Short())
		}
		if len(chain) >= MaxChainDepth {
			return nil, fmt.Errorf("overlay %s: more than %d layers of parents", Redact(ref), MaxChainDepth)
		}
		seen[p.ID] = true
		pref := ResolveLocation(ref, p.Location)
		src, err := open(pref)
		if err != nil {
			return nil, fmt.Errorf("parent overlay %s (%s) of %s is missing: %w", p.ID.Short(), Redact(pref), Redact(ref), err)
		}
		po, err := OpenOverlay(ctx, src)
		if err != nil {
			src.Close()
			return nil, fmt.Errorf("parent overlay %s of %s is missing or unreadable: %w", p.ID.Short(), Redact(ref), err)
		}
		if err := o.CheckParent(po); err != nil {
			src.Close()
			return nil, fmt.Errorf("overlay %s: %w", Redact(ref), err)
		}
		chain = append(chain, Layer{Overlay: po, Source: src, Ref: pref})
		o, ref = po, pref
	}
	return chain, nil
}

// ReaderAt reads a source as a file, each read bounded by ctx.
func ReaderAt(ctx context.Context, src Source) io.ReaderAt { return srcReaderAt{ctx, src} }

type srcReaderAt struct {
	ctx context.Context
	src Source
}

func (r srcReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if size := r.src.Size(); size >= 0 && off+int64(len(p)) > size {
		if off >= size {
			return 0, io.EOF
		}
		n, err := r.ReadAt(p[:size-off], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	b, err := readRetrying(r.ctx, r.src, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	return copy(p, b), nil
}

// ExtractChain writes the images of every overlay in chain (nearest first,
// as OpenParents returns it) into directories under tmp, farthest first,
// each resolved against the one before, and returns the nearest's images.
// The returned function closes and removes them all.
func ExtractChain(ctx context.Context, chain []Layer, base *overlay.Base, tmp string, workers int) ([2]io.ReaderAt, func(), error) {
	var files []*os.File
	var dirs []string
	cleanup := func() {
		for _, f := range files {
			f.Close()
		}
		for _, d := range dirs {
			os.RemoveAll(d)
		}
	}
	var below [2]io.ReaderAt
	for i := len(chain) - 1; i >= 0; i-- {
		l := chain[i]
		o, err := overlay.Open(ReaderAt(ctx, l.Source), l.Source.Size())
		if err != nil {
			cleanup()
			return below, nil, fmt.Errorf("parent overlay %s: %w", Redact(l.Ref), err)
		}
		if o.ID != l.Overlay.ID {
			cleanup()
			return below, nil, fmt.Errorf("overlay %s changed while it was read: it is %s now, %s before", Redact(l.Ref), o.ID.Short(), l.Overlay.ID.Short())
		}
		if i < len(chain)-1 {
			o.SetParentImages(below)
		}
		dir, err := os.MkdirTemp(tmp, ".cloudletfs-parent-")
		if err != nil {
			cleanup()
			return below, nil, err
		}
		dirs = append(dirs, dir)
		if err := overlay.ExtractContext(ctx, o, base, dir, workers, nil); err != nil {
			cleanup()
			return below, nil, fmt.Errorf("parent overlay %s: %w", Redact(l.Ref), err)
		}
		for j, name := range []string{overlay.DiskFile, overlay.MemoryFile} {
			f, err := os.Open(filepath.Join(dir, name))
			if err != nil {
				cleanup()
				return below, nil, err
			}
			files = append(files, f)
			below[j] = f
		}
	}
	if len(chain) == 0 {
		return below, nil, errors.New("an empty chain of overlays")
	}
	return below, cleanup, nil
}
