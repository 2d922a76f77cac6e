package overlay

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
)

// Version is the format version of an overlay built against a base alone.
// LayeredVersion is that of a layered overlay, one that names a parent
// overlay and takes chunks from it: a reader of version 1 alone rejects it
// by its version, rather than misreading its parent references.
const (
	Version        = 1
	LayeredVersion = 2
)

// MaxParentLocation bounds the length of a parent's location.
const MaxParentLocation = 4096

// HeaderSize is the length of the fixed header at the start of every overlay.
const HeaderSize = 256

// Magic opens every overlay file.
var Magic = [8]byte{'C', 'L', 'D', 'L', 'T', 'O', 'V', 'L'}

// Limits applied to every overlay before anything is allocated from what it
// claims. They are far above any real VM and far below what would exhaust a
// cloudlet.
const (
	MinChunkSize     = 512
	MaxChunkSize     = 1 << 20
	DefaultChunkSize = 4096
	MaxImageSize     = 1 << 40 // 1 TiB per image
	MaxChunks        = 1 << 28 // per image
	MaxSegmentRaw    = 64 << 20
	MaxStateSize     = 256 << 20
	MaxVMConfigSize  = 1 << 20
	DefaultSegment   = 1 << 20
)

// Image names one of the two chunked images of a VM.
type Image uint8

// The images, in the order the manifest lists them.
const (
	Disk   Image = 0
	Memory Image = 1
)

// Images lists both images in manifest order.
var Images = [2]Image{Disk, Memory}

func (i Image) String() string {
	switch i {
	case Disk:
		return "disk"
	case Memory:
		return "memory"
	}
	return fmt.Sprintf("image(%d)", uint8(i))
}

// ParseImage parses "disk" or "memory".
func ParseImage(s string) (Image, error) {
	switch s {
	case "disk":
		return Disk, nil
	case "memory":
		return Memory, nil
	}
	return 0, fmt.Errorf("unknown image %q: want disk or memory", s)
}

// Digest is a sha256.
type Digest [32]byte

func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// Short is the first 12 hex digits, enough to tell digests apart in output.
func (d Digest) Short() string { return d.String()[:12] }

// ParseDigest parses 64 hex digits.
func ParseDigest(s string) (Digest, error) {
	var d Digest
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(d) {
		return d, fmt.Errorf("%q is not a sha256 (64 hex digits)", s)
	}
	copy(d[:], b)
	return d, nil
}

// Blob locates one compressed metadata part: the manifest, the state or vm.json.
type Blob struct {
	Stored uint64 // bytes in the file
	Raw    uint64 // bytes after decompression
	SHA    Digest // sha256 of the stored bytes
}

// Header is the fixed-size start of an overlay. Its last 32 bytes are a
// sha256 of the rest, so every field, and through the digests every later
// byte, is covered.
type Header struct {
	Version     uint16
	ChunkSize   uint32
	DiskSize    uint64
	MemorySize  uint64
	BaseID      Digest
	MetaCodec   Codec
	HasVMConfig bool
	Manifest    Blob
	State       Blob
	VMConfig    Blob
	SegmentsLen uint64 // total stored bytes of all segments
}

// Layered reports whether the overlay names a parent overlay.
func (h *Header) Layered() bool { return h.Version == LayeredVersion }

// Offsets of the sections, derived from the header.
func (h *Header) manifestOff() int64 { return HeaderSize }
func (h *Header) stateOff() int64    { return h.manifestOff() + int64(h.Manifest.Stored) }
func (h *Header) vmconfigOff() int64 { return h.stateOff() + int64(h.State.Stored) }

// SegmentsOff is where the first segment starts.
func (h *Header) SegmentsOff() int64 { return h.vmconfigOff() + int64(h.VMConfig.Stored) }

// MetadataLen is the number of bytes a reader needs before any segment:
// header, manifest, state and vm.json.
func (h *Header) MetadataLen() int64 { return h.SegmentsOff() }

// TotalLen is the size the whole overlay file must have.
func (h *Header) TotalLen() int64 { return h.SegmentsOff() + int64(h.SegmentsLen) }

// Chunks returns the number of chunks of an image of the given size.
func (h *Header) Chunks(img Image) int {
	return chunkCount(h.ImageSize(img), int64(h.ChunkSize))
}

// ImageSize returns the size of the custom image.
func (h *Header) ImageSize(img Image) int64 {
	if img == Memory {
		return int64(h.MemorySize)
	}
	return int64(h.DiskSize)
}

func chunkCount(size, chunk int64) int { return int((size + chunk - 1) / chunk) }

// Marshal encodes the header into its HeaderSize bytes, checksum included.
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	le := binary.LittleEndian
	copy(b[0:8], Magic[:])
	le.PutUint16(b[8:], h.Version)
	le.PutUint16(b[10:], HeaderSize)
	le.PutUint32(b[12:], h.ChunkSize)
	le.PutUint64(b[16:], h.DiskSize)
	le.PutUint64(b[24:], h.MemorySize)
	copy(b[32:64], h.BaseID[:])
	b[64] = byte(h.MetaCodec)
	if h.HasVMConfig {
		b[65] = 1
	}
	putBlob(b[72:], h.Manifest)
	putBlob(b[120:], h.State)
	putBlob(b[168:], h.VMConfig)
	le.PutUint64(b[216:], h.SegmentsLen)
	sum := sha256.Sum256(b[:224])
	copy(b[224:], sum[:])
	return b
}

func putBlob(b []byte, bl Blob) {
	binary.LittleEndian.PutUint64(b[0:], bl.Stored)
	binary.LittleEndian.PutUint64(b[8:], bl.Raw)
	copy(b[16:48], bl.SHA[:])
}

func getBlob(b []byte) Blob {
	var bl Blob
	bl.Stored = binary.LittleEndian.Uint64(b[0:])
	bl.Raw = binary.LittleEndian.Uint64(b[8:])
	copy(bl.SHA[:], b[16:48])
	return bl
}

// UnmarshalHeader decodes and checks a header. It rejects an unknown version
// or codec and any size beyond the package limits, so that nothing a corrupt
// or hostile header claims is ever allocated.
func UnmarshalHeader(b []byte) (*Header, error) {
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("header: file is %d bytes, shorter than the %d-byte header: truncated or not an overlay", len(b), HeaderSize)
	}
	if !bytes.Equal(b[0:8], Magic[:]) {
		return nil, fmt.Errorf("header: bad magic %q: not a cloudletfs overlay", b[0:8])
	}
	le := binary.LittleEndian
	h := &Header{Version: le.Uint16(b[8:])}
	if h.Version != Version && h.Version != LayeredVersion {
		return nil, fmt.Errorf("header: format version %d is not supported (this build reads versions %d and %d)", h.Version, Version, LayeredVersion)
	}
	if hl := le.Uint16(b[10:]); hl != HeaderSize {
		return nil, fmt.Errorf("header: header length %d, want %d", hl, HeaderSize)
	}
	if sum := sha256.Sum256(b[:224]); !bytes.Equal(sum[:], b[224:256]) {
		return nil, fmt.Errorf("header: checksum mismatch: the header is corrupt")
	}
	h.ChunkSize = le.Uint32(b[12:])
	h.DiskSize = le.Uint64(b[16:])
	h.MemorySize = le.Uint64(b[24:])
	copy(h.BaseID[:], b[32:64])
	h.MetaCodec = Codec(b[64])
	h.HasVMConfig = b[65]&1 != 0
	h.Manifest = getBlob(b[72:])
	h.State = getBlob(b[120:])
	h.VMConfig = getBlob(b[168:])
	h.SegmentsLen = le.Uint64(b[216:])
	if err := h.check(); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	return h, nil
}

// check applies the package limits to what the header claims.
func (h *Header) check() error {
	if !h.MetaCodec.valid() {
		return fmt.Errorf("metadata codec %d is not supported by this build (known: none, xz, zstd)", uint8(h.MetaCodec))
	}
	cs := h.ChunkSize
	if cs < MinChunkSize || cs > MaxChunkSize || cs&(cs-1) != 0 {
		return fmt.Errorf("chunk size %d is not a power of two between %d and %d", cs, MinChunkSize, MaxChunkSize)
	}
	for _, img := range Images {
		size := uint64(h.ImageSize(img))
		if size > MaxImageSize {
			return fmt.Errorf("%s size %d exceeds the limit of %d bytes", img, size, uint64(MaxImageSize))
		}
		if n := (size + uint64(cs) - 1) / uint64(cs); n > MaxChunks {
			return fmt.Errorf("%s has %d chunks, more than the limit of %d", img, n, MaxChunks)
		}
	}
	n := h.Chunks(Disk) + h.Chunks(Memory)
	if max := manifestBound(n); h.Manifest.Raw > max || h.Manifest.Stored > max+(1<<20) {
		return fmt.Errorf("manifest claims %d bytes (%d stored), more than %d chunks can need", h.Manifest.Raw, h.Manifest.Stored, n)
	}
	if h.Manifest.Raw < uint64(n) {
		return fmt.Errorf("manifest claims %d bytes, fewer than the %d chunks it must describe", h.Manifest.Raw, n)
	}
	if h.State.Raw > MaxStateSize || h.State.Stored > MaxStateSize+(1<<20) {
		return fmt.Errorf("state claims %d bytes, more than the limit of %d", h.State.Raw, MaxStateSize)
	}
	if !h.HasVMConfig && (h.VMConfig.Stored != 0 || h.VMConfig.Raw != 0) {
		return fmt.Errorf("vm.json is absent but has a size")
	}
	if h.VMConfig.Raw > MaxVMConfigSize || h.VMConfig.Stored > MaxVMConfigSize+(1<<16) {
		return fmt.Errorf("vm.json claims %d bytes, more than the limit of %d", h.VMConfig.Raw, MaxVMConfigSize)
	}
	if h.SegmentsLen > 2*MaxImageSize {
		return fmt.Errorf("segments claim %d bytes, more than two images can need", h.SegmentsLen)
	}
	return nil
}

// manifestBound is the largest raw manifest n chunks can need: per chunk a
// reference (tag, image, varint), an order entry and a segment-table entry.
func manifestBound(n int) uint64 {
	return 64 + 32 + binary.MaxVarintLen32 + MaxParentLocation + uint64(n)*(12+11+segEntryMax)
}
