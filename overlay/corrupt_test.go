package overlay

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"
)

// sample builds a small overlay and returns its bytes.
func sample(t testing.TB) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	bd, bm, cd, cm := pair(rng, 40*testChunk, 40*testChunk, 40*testChunk+10, 40*testChunk)
	path, _ := build(t, t.TempDir(), newBase(t, bd, bm), cd, cm, BuildOptions{Codec: CodecZstd, SegmentSize: 4 * testChunk})
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openBytes(b []byte) (*Overlay, error) {
	return Open(bytes.NewReader(b), int64(len(b)))
}

// resealHeader rewrites a header field and fixes the header checksum, as a
// hostile or buggy writer would.
func resealHeader(b []byte, edit func(h []byte)) []byte {
	b = append([]byte(nil), b...)
	edit(b[:HeaderSize])
	sum := sha256.Sum256(b[:224])
	copy(b[224:256], sum[:])
	return b
}

func TestCorruptionIsNamed(t *testing.T) {
	good := sample(t)
	o, err := openBytes(good)
	if err != nil {
		t.Fatal(err)
	}
	h := o.Header
	flip := func(off int64) []byte {
		b := append([]byte(nil), good...)
		b[off] ^= 0x10
		return b
	}
	last := len(o.Manifest.Segments) - 1
	seg := o.Manifest.Segments[last]
	for name, tc := range map[string]struct {
		b    []byte
		want string
	}{
		"header bit":   {flip(20), "header: checksum mismatch"},
		"magic":        {flip(0), "not a cloudletfs overlay"},
		"manifest bit": {flip(h.manifestOff() + 3), "manifest: sha256 mismatch"},
		"state bit":    {flip(h.stateOff() + 1), "state: sha256 mismatch"},
		"vm.json bit":  {flip(h.vmconfigOff()), "vm.json: sha256 mismatch"},
		"truncated":    {good[:len(good)-1], "truncated"},
		"header only":  {good[:100], "truncated"},
		"trailing":     {append(append([]byte(nil), good...), 0), "trailing data"},
		"version":      {resealHeader(good, func(b []byte) { b[8] = 9 }), "format version 9 is not supported"},
		"meta codec":   {resealHeader(good, func(b []byte) { b[64] = 7 }), "metadata codec 7 is not supported"},
		"chunk size":   {resealHeader(good, func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 1000) }), "chunk size 1000"},
		"huge disk":    {resealHeader(good, func(b []byte) { binary.LittleEndian.PutUint64(b[16:], 1<<62) }), "disk size"},
		"huge manifest": {resealHeader(good, func(b []byte) {
			binary.LittleEndian.PutUint64(b[80:], 1<<50)
		}), "manifest claims"},
		"huge state": {resealHeader(good, func(b []byte) { binary.LittleEndian.PutUint64(b[128:], 1<<40) }), "state claims"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := openBytes(tc.b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}

	// A flipped bit in a segment is found by Verify and names the segment.
	bad, err := openBytes(flip(seg.Offset + int64(seg.Stored)/2))
	if err != nil {
		t.Fatal(err)
	}
	if err := bad.Verify(2, nil); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("segment %d: sha256 mismatch", last)) {
		t.Fatalf("flipped segment bit: got %v", err)
	}
}

// A header may claim the largest images the limits allow; what it claims
// must not be allocated before the manifest's bytes back it up.
func TestClaimsAreNotAllocated(t *testing.T) {
	good := sample(t)
	for name, tc := range map[string]struct {
		edit func(b []byte)
		want string
	}{
		"short manifest": {func(b []byte) { binary.LittleEndian.PutUint64(b[16:], 1<<40) }, "fewer than"},
		"long claim": {func(b []byte) {
			binary.LittleEndian.PutUint64(b[16:], 1<<40)
			binary.LittleEndian.PutUint64(b[80:], 1<<31)
		}, "manifest"},
	} {
		t.Run(name, func(t *testing.T) {
			b := resealHeader(good, tc.edit)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := openBytes(b)
			runtime.ReadMemStats(&after)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 16<<20 {
				t.Fatalf("rejecting the overlay allocated %d bytes", n)
			}
		})
	}
}

// A manifest whose segment table names an unknown codec is refused by name.
func TestUnknownSegmentCodec(t *testing.T) {
	good := sample(t)
	o, err := openBytes(good)
	if err != nil {
		t.Fatal(err)
	}
	o.Manifest.Segments[0].Codec = 9
	raw := o.Manifest.Encode()
	_, err = DecodeManifest(bytes.NewReader(raw), o.Header, o.Header.SegmentsOff())
	if err == nil || !strings.Contains(err.Error(), "segment 0: codec 9 is not supported") {
		t.Fatalf("got %v", err)
	}
}

func FuzzDecodeManifest(f *testing.F) {
	good := sample(f)
	o, err := openBytes(good)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(o.Manifest.Encode(), uint16(o.Header.Chunks(Disk)), uint16(o.Header.Chunks(Memory)))
	f.Add([]byte{0, 0, 0, 0}, uint16(2), uint16(2))
	f.Add([]byte{1, 2, 1, 3, 4}, uint16(1), uint16(0))
	f.Fuzz(func(t *testing.T, raw []byte, disk, mem uint16) {
		h := &Header{ChunkSize: testChunk, DiskSize: uint64(disk) * testChunk, MemorySize: uint64(mem)*testChunk - uint64(mem%3)}
		m, err := DecodeManifest(bytes.NewReader(raw), h, HeaderSize)
		if err != nil {
			return
		}
		// Whatever decodes must be self-consistent and encode back to
		// something that decodes to the same manifest.
		m2, err := DecodeManifest(bytes.NewReader(m.Encode()), h, HeaderSize)
		if err != nil {
			t.Fatalf("re-encoded manifest does not decode: %v", err)
		}
		if len(m2.Order) != len(m.Order) || len(m2.Segments) != len(m.Segments) {
			t.Fatal("re-encoded manifest differs")
		}
		for _, img := range Images {
			for i, r := range m.Refs[img] {
				if m2.Refs[img][i] != r {
					t.Fatalf("%s chunk %d: %v became %v", img, i, r, m2.Refs[img][i])
				}
			}
		}
	})
}

// The segment decoder never panics and never returns other than the
// declared length, whatever bytes and codec it is handed.
func FuzzDecompress(f *testing.F) {
	raw := bytes.Repeat([]byte("cloudlet "), 500)
	for _, c := range []Codec{CodecNone, CodecXZ, CodecZstd} {
		comp, err := compress(c, raw)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(c), comp, uint16(len(raw)))
	}
	f.Fuzz(func(t *testing.T, codec uint8, comp []byte, rawLen uint16) {
		out, err := decompress(Codec(codec%4), comp, int(rawLen))
		if err == nil && len(out) != int(rawLen) {
			t.Fatalf("decoded %d bytes, declared %d", len(out), rawLen)
		}
	})
}
