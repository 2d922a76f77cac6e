package overlay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Kind says where a chunk's bytes come from. The value is stored in the
// manifest, so existing values never change meaning.
type Kind uint8

// Chunk reference kinds, cheapest first.
const (
	Zero       Kind = 0 // all zero bytes
	BaseDisk   Kind = 1 // a chunk of the base disk image, at any offset
	BaseMemory Kind = 2 // a chunk of the base memory image, at any offset
	Self       Kind = 3 // the same bytes as a data chunk of this overlay
	Data       Kind = 4 // bytes carried in a segment
	// A layered overlay's chunks that its parent supplies: a chunk of the
	// parent's disk or memory image, as the parent's own chain resolves it.
	ParentDisk   Kind = 5
	ParentMemory Kind = 6
	numKinds          = 7
)

// Kinds lists every kind, for summaries.
var Kinds = [numKinds]Kind{Zero, BaseDisk, BaseMemory, Self, Data, ParentDisk, ParentMemory}

func (k Kind) String() string {
	switch k {
	case Zero:
		return "zero"
	case BaseDisk:
		return "base-disk"
	case BaseMemory:
		return "base-memory"
	case Self:
		return "self"
	case Data:
		return "data"
	case ParentDisk:
		return "parent-disk"
	case ParentMemory:
		return "parent-memory"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Ref is the manifest entry of one chunk. Index is the base chunk for
// BaseDisk and BaseMemory, the parent's chunk for ParentDisk and
// ParentMemory, the target chunk (in image Image) for Self, and the
// chunk's position in stream order for Data.
type Ref struct {
	Kind  Kind
	Image Image
	Index uint32
}

// ChunkID names one chunk of one image.
type ChunkID struct {
	Image Image
	Index uint32
}

func (c ChunkID) String() string { return fmt.Sprintf("%s chunk %d", c.Image, c.Index) }

// Segment is one entry of the segment table. Its chunks are Order[First :
// First+Count].
type Segment struct {
	Codec  Codec
	Offset int64 // absolute offset in the overlay file
	Stored uint32
	Raw    uint32
	SHA    Digest // sha256 of the stored bytes
	First  int
	Count  int
}

// Manifest is the decoded map of an overlay: a reference per chunk, the data
// chunks in stream order, and the segments that carry them.
type Manifest struct {
	Parent   *Parent // set in a layered overlay only
	Refs     [2][]Ref
	Order    []ChunkID
	Segments []Segment
}

// Parent names the overlay a layered overlay is built on.
type Parent struct {
	ID Digest // the parent's overlay ID
	// Location is where to fetch the parent: a URL, or a path or URL
	// reference resolved against the layered overlay's own location.
	Location string
}

const segEntryMax = 1 + 3*binary.MaxVarintLen32 + 32

// Encode writes the raw (uncompressed) manifest. docs/FORMAT.md gives the
// layout.
func (m *Manifest) Encode() []byte {
	var b []byte
	if m.Parent != nil {
		b = append(b, m.Parent.ID[:]...)
		b = binary.AppendUvarint(b, uint64(len(m.Parent.Location)))
		b = append(b, m.Parent.Location...)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Segments)))
	for _, s := range m.Segments {
		b = append(b, byte(s.Codec))
		b = binary.AppendUvarint(b, uint64(s.Count))
		b = binary.AppendUvarint(b, uint64(s.Raw))
		b = binary.AppendUvarint(b, uint64(s.Stored))
		b = append(b, s.SHA[:]...)
	}
	prev := [4]int64{-1, -1, -1, -1} // last chunk referred to, per base and parent image
	for _, img := range Images {
		for _, r := range m.Refs[img] {
			b = append(b, byte(r.Kind))
			switch r.Kind {
			case BaseDisk, BaseMemory, ParentDisk, ParentMemory:
				bi := refSlot(r.Kind)
				b = binary.AppendVarint(b, int64(r.Index)-(prev[bi]+1))
				prev[bi] = int64(r.Index)
			case Self:
				b = append(b, byte(r.Image))
				b = binary.AppendUvarint(b, uint64(r.Index))
			}
		}
	}
	b = binary.AppendUvarint(b, uint64(len(m.Order)))
	prev = [4]int64{-1, -1} // the order's previous chunk, per image
	for _, c := range m.Order {
		d := int64(c.Index) - (prev[c.Image] + 1)
		zz := uint64(d<<1) ^ uint64(d>>63)
		b = binary.AppendUvarint(b, zz<<1|uint64(c.Image))
		prev[c.Image] = int64(c.Index)
	}
	return b
}

// refSlot numbers the images a delta-coded reference can name: base disk,
// base memory, parent disk, parent memory.
func refSlot(k Kind) int {
	if k >= ParentDisk {
		return 2 + int(k-ParentDisk)
	}
	return int(k - BaseDisk)
}

// errManifest marks every decoding failure so callers can name the part.
var errManifest = errors.New("manifest")

func badManifest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errManifest, fmt.Sprintf(format, args...))
}

// DecodeManifest reads a raw manifest for a header's images. It allocates no
// more than the header's chunk counts allow and checks every reference: kinds,
// targets within the images, each data chunk in the order exactly once, and
// segment sizes that add up. segOff is where the first segment starts and
// segLen the total stored length the header declares.
func DecodeManifest(r io.Reader, h *Header, segOff int64) (*Manifest, error) {
	br := bufio.NewReader(r)
	m := &Manifest{}
	total := h.Chunks(Disk) + h.Chunks(Memory)

	if h.Layered() {
		p := &Parent{}
		if _, err := io.ReadFull(br, p.ID[:]); err != nil {
			return nil, badManifest("parent: %v", err)
		}
		n, err := binary.ReadUvarint(br)
		if err != nil {
			return nil, badManifest("parent location: %v", err)
		}
		if n == 0 || n > MaxParentLocation {
			return nil, badManifest("parent location of %d bytes: want 1 to %d", n, MaxParentLocation)
		}
		loc := make([]byte, n)
		if _, err := io.ReadFull(br, loc); err != nil {
			return nil, badManifest("parent location: %v", err)
		}
		p.Location = string(loc)
		m.Parent = p
	}

	nseg, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, badManifest("segment count: %v", err)
	}
	if nseg > uint64(total) {
		return nil, badManifest("%d segments for %d chunks", nseg, total)
	}
	m.Segments = make([]Segment, nseg)
	off := segOff
	first := 0
	for i := range m.Segments {
		s := &m.Segments[i]
		c, err := br.ReadByte()
		if err != nil {
			return nil, badManifest("segment %d: %v", i, err)
		}
		s.Codec = Codec(c)
		if !s.Codec.valid() {
			return nil, badManifest("segment %d: codec %d is not supported by this build (known: none, xz, zstd)", i, c)
		}
		var v [3]uint64
		for j := range v {
			if v[j], err = binary.ReadUvarint(br); err != nil {
				return nil, badManifest("segment %d: %v", i, err)
			}
		}
		count, raw, stored := v[0], v[1], v[2]
		if count == 0 || count > uint64(total) || raw == 0 || raw > MaxSegmentRaw || stored > MaxSegmentRaw+(1<<20) {
			return nil, badManifest("segment %d: impossible sizes (%d chunks, %d raw bytes, %d stored)", i, count, raw, stored)
		}
		if _, err := io.ReadFull(br, s.SHA[:]); err != nil {
			return nil, badManifest("segment %d: %v", i, err)
		}
		s.Count, s.Raw, s.Stored = int(count), uint32(raw), uint32(stored)
		s.First = first
		s.Offset = off
		first += s.Count
		off += int64(s.Stored)
	}
	if first > total {
		return nil, badManifest("segments hold %d chunks, images have %d", first, total)
	}
	if uint64(off-segOff) != h.SegmentsLen {
		return nil, badManifest("segments add up to %d bytes, header says %d", off-segOff, h.SegmentsLen)
	}

	prev := [4]int64{-1, -1, -1, -1}
	ndata := 0
	for _, img := range Images {
		n := h.Chunks(img)
		// Grow as entries decode rather than trusting the count up front,
		// so memory follows the bytes actually present.
		refs := make([]Ref, 0, min(n, 1<<16))
		for i := range n {
			k, err := br.ReadByte()
			if err != nil {
				return nil, badManifest("%s chunk %d: %v", img, i, err)
			}
			r := Ref{Kind: Kind(k)}
			switch r.Kind {
			case Zero:
			case BaseDisk, BaseMemory, ParentDisk, ParentMemory:
				if r.Kind >= ParentDisk && m.Parent == nil {
					return nil, badManifest("%s chunk %d: a parent reference in an overlay that names no parent", img, i)
				}
				d, err := binary.ReadVarint(br)
				if err != nil {
					return nil, badManifest("%s chunk %d: %v", img, i, err)
				}
				bi := refSlot(r.Kind)
				idx := prev[bi] + 1 + d
				if idx < 0 || idx >= MaxChunks {
					return nil, badManifest("%s chunk %d: %s chunk %d out of range", img, i, r.Kind, idx)
				}
				r.Index = uint32(idx)
				prev[bi] = idx
			case Self:
				ti, err := br.ReadByte()
				if err != nil {
					return nil, badManifest("%s chunk %d: %v", img, i, err)
				}
				idx, err := binary.ReadUvarint(br)
				if err != nil {
					return nil, badManifest("%s chunk %d: %v", img, i, err)
				}
				if ti > byte(Memory) || idx >= uint64(h.Chunks(Image(ti))) {
					return nil, badManifest("%s chunk %d: refers to %s chunk %d, beyond the image", img, i, Image(ti), idx)
				}
				r.Image, r.Index = Image(ti), uint32(idx)
			case Data:
				r.Index = ^uint32(0) // set from the order list below
				ndata++
			default:
				return nil, badManifest("%s chunk %d: unknown reference kind %d", img, i, k)
			}
			refs = append(refs, r)
		}
		m.Refs[img] = refs
	}

	nord, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, badManifest("order length: %v", err)
	}
	if nord != uint64(ndata) || nord != uint64(first) {
		return nil, badManifest("order lists %d chunks; %d are data and segments hold %d", nord, ndata, first)
	}
	m.Order = make([]ChunkID, nord)
	prev = [4]int64{-1, -1} // the order's previous chunk, per image
	for pos := range m.Order {
		v, err := binary.ReadUvarint(br)
		if err != nil {
			return nil, badManifest("order entry %d: %v", pos, err)
		}
		img := Image(v & 1)
		zz := v >> 1
		d := int64(zz>>1) ^ -int64(zz&1)
		idx := prev[img] + 1 + d
		if idx < 0 || idx >= int64(len(m.Refs[img])) {
			return nil, badManifest("order entry %d: %s chunk %d beyond the image", pos, img, idx)
		}
		r := &m.Refs[img][idx]
		if r.Kind != Data || r.Index != ^uint32(0) {
			return nil, badManifest("order entry %d: %s chunk %d is not an unplaced data chunk", pos, img, idx)
		}
		r.Index = uint32(pos)
		prev[img] = idx
		m.Order[pos] = ChunkID{img, uint32(idx)}
	}
	if _, err := br.ReadByte(); err != io.EOF {
		if err != nil {
			return nil, badManifest("%v", err)
		}
		return nil, badManifest("trailing bytes after the order list")
	}

	// Self references must name data chunks, and each segment's raw size
	// must be the sum of its chunks.
	for _, img := range Images {
		for i, r := range m.Refs[img] {
			if r.Kind == Self && m.Refs[r.Image][r.Index].Kind != Data {
				return nil, badManifest("%s chunk %d: self reference to %s chunk %d, which is not data", img, i, r.Image, r.Index)
			}
		}
	}
	for i, s := range m.Segments {
		var raw int64
		for _, c := range m.Order[s.First : s.First+s.Count] {
			raw += chunkLen(h, c)
		}
		if raw != int64(s.Raw) {
			return nil, badManifest("segment %d: chunks add up to %d bytes, table says %d", i, raw, s.Raw)
		}
	}
	return m, nil
}

// chunkLen is the length of a chunk: the chunk size, or less for the last
// chunk of an image whose size is not a whole number of chunks.
func chunkLen(h *Header, c ChunkID) int64 {
	cs := int64(h.ChunkSize)
	off := int64(c.Index) * cs
	return min(cs, h.ImageSize(c.Image)-off)
}

// ChunkLen is the length of chunk c in bytes.
func (h *Header) ChunkLen(c ChunkID) int64 { return chunkLen(h, c) }

// SegmentOf returns the segment that carries the data chunk at stream
// position pos.
func (m *Manifest) SegmentOf(pos int) int {
	lo, hi := 0, len(m.Segments)
	for lo < hi {
		mid := (lo + hi) / 2
		if m.Segments[mid].First+m.Segments[mid].Count <= pos {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}
