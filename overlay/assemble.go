package overlay

import (
	"crypto/sha256"
	"fmt"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
)

// Encoder is a segment codec at one effort: what a writer that picks the
// codec per segment, to suit its link and CPU, chooses among. Readers see
// only the codec.
type Encoder struct {
	Name  string // e.g. "zstd-1"
	Codec Codec
	zstd  *zstd.Encoder
}

// Encoders lists the codecs and efforts to choose among, cheapest first.
var Encoders = []*Encoder{
	{Name: "none", Codec: CodecNone},
	{Name: "zstd-1", Codec: CodecZstd, zstd: newZstd(zstd.SpeedFastest)},
	{Name: "zstd-3", Codec: CodecZstd, zstd: newZstd(zstd.SpeedDefault)},
	{Name: "zstd-7", Codec: CodecZstd, zstd: zstdEnc},
	{Name: "xz", Codec: CodecXZ},
}

func newZstd(l zstd.EncoderLevel) *zstd.Encoder {
	e, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(l), zstd.WithEncoderConcurrency(1))
	return e
}

// Encode compresses one segment's raw bytes.
func (e *Encoder) Encode(raw []byte) ([]byte, error) {
	if e.zstd != nil {
		return e.zstd.EncodeAll(raw, make([]byte, 0, len(raw)/2)), nil
	}
	return compress(e.Codec, raw)
}

// Assemble writes an overlay whose segments are already compressed: h and
// m describe it, with m's segments in order and each segment's Codec,
// First, Count and Raw set; segment returns segment i's stored bytes. It
// fills in the rest of h and m (blobs, sizes, digests, offsets), writes
// the file atomically as Build does, and returns the overlay's ID.
func Assemble(out string, h *Header, m *Manifest, state, vmConfig []byte, segment func(i int) ([]byte, error)) (Digest, error) {
	id, err := assemble(out, h, m, state, vmConfig, segment)
	return id, hideTemp(err)
}

func assemble(out string, h *Header, m *Manifest, state, vmConfig []byte, segment func(i int) ([]byte, error)) (Digest, error) {
	h.HasVMConfig = vmConfig != nil
	if (m.Parent != nil) != h.Layered() {
		return Digest{}, fmt.Errorf("a parent needs format version %d and only it", LayeredVersion)
	}
	segs, err := tempFile(out + segmentsSuffix)
	if err != nil {
		return Digest{}, err
	}
	defer discard(segs)
	h.SegmentsLen = 0
	for i := range m.Segments {
		b, err := segment(i)
		if err != nil {
			return Digest{}, err
		}
		s := &m.Segments[i]
		s.Stored, s.SHA = uint32(len(b)), sha256.Sum256(b)
		h.SegmentsLen += uint64(len(b))
		if _, err := segs.Write(b); err != nil {
			return Digest{}, err
		}
	}
	f, err := tempFile(out)
	if err != nil {
		return Digest{}, err
	}
	committed := false
	defer func() {
		if !committed {
			discard(f)
		}
	}()
	var meta [3][]byte
	blobs := [3]*Blob{&h.Manifest, &h.State, &h.VMConfig}
	for i, raw := range [][]byte{m.Encode(), state, vmConfig} {
		if i == 2 && vmConfig == nil {
			break
		}
		c, err := compress(h.MetaCodec, raw)
		if err != nil {
			return Digest{}, err
		}
		meta[i] = c
		*blobs[i] = Blob{Stored: uint64(len(c)), Raw: uint64(len(raw)), SHA: sha256.Sum256(c)}
	}
	hb := h.Marshal()
	for _, p := range [][]byte{hb, meta[0], meta[1], meta[2]} {
		if _, err := f.Write(p); err != nil {
			return Digest{}, err
		}
	}
	if _, err := segs.Seek(0, 0); err != nil {
		return Digest{}, err
	}
	if _, err := f.ReadFrom(segs); err != nil {
		return Digest{}, err
	}
	if err := commit(f, out); err != nil {
		return Digest{}, err
	}
	committed = true
	off := h.SegmentsOff()
	for i := range m.Segments {
		m.Segments[i].Offset = off
		off += int64(m.Segments[i].Stored)
	}
	return sha256.Sum256(hb), syncDir(filepath.Dir(out))
}
