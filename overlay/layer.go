package overlay

import (
	"fmt"
	"io"
)

// A layered overlay names its parent in its manifest (Manifest.Parent) and
// takes the chunks the parent's VM already has from it, by ParentDisk and
// ParentMemory references. The parent may itself be layered: a chain ends at
// an overlay built against the base alone, and every layer of it is built
// against the same base.

// CheckParent reports whether p is the parent o names and can supply every
// chunk o takes from it.
func (o *Overlay) CheckParent(p *Overlay) error {
	want := o.Manifest.Parent
	if want == nil {
		return fmt.Errorf("overlay %s names no parent", o.ID.Short())
	}
	if p.ID != want.ID {
		return fmt.Errorf("parent %s is overlay %s, not the %s the layer names", want.Location, p.ID.Short(), want.ID.Short())
	}
	if p.Header.BaseID != o.Header.BaseID {
		return fmt.Errorf("parent %s is built on base %s, the layer on base %s: a chain has one base", want.Location, p.Header.BaseID.Short(), o.Header.BaseID.Short())
	}
	if p.Header.ChunkSize != o.Header.ChunkSize {
		return fmt.Errorf("parent %s has chunk size %d, the layer %d", want.Location, p.Header.ChunkSize, o.Header.ChunkSize)
	}
	for _, img := range Images {
		for i, r := range o.Manifest.Refs[img] {
			if r.Kind == ParentDisk || r.Kind == ParentMemory {
				pimg := Image(r.Kind - ParentDisk)
				if int(r.Index) >= p.Header.Chunks(pimg) {
					return fmt.Errorf("manifest: %s chunk %d refers to %s chunk %d, beyond the parent's image", img, i, r.Kind, r.Index)
				}
			}
		}
	}
	return nil
}

// SetParentImages gives a layered overlay its parent's images, as the
// parent's chain resolves them, for Extract to copy parent chunks from.
func (o *Overlay) SetParentImages(imgs [2]io.ReaderAt) { o.parent = imgs }

// ParentHashes is what Build needs of a parent to build a layer on it.
type ParentHashes struct {
	Parent Parent
	// Hashes are the digests of every chunk of the parent's images, as its
	// chain resolves them (the last chunk hashed as if padded with zeros).
	Hashes [2][]Digest
}
