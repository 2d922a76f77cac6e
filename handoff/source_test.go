package handoff

import (
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// newTestSender is a sender of a memory image of pages chunks, each of
// the overlay's own marked by its first byte, with no QEMU behind it:
// the test feeds it pages as the stream would.
func newTestSender(t *testing.T, pages int) *sender {
	dir := t.TempDir()
	h := &sender{codec: newChooser(), inBuf: map[overlay.ChunkID]int{}, lastDisk: time.Now().Add(time.Hour)}
	h.opt.SegmentSize = 4 * pageSize
	h.opt.Dir = dir
	h.opt.ParentLocation = "parent.overlay"
	h.cs = pageSize
	h.zero = sha256.Sum256(make([]byte, pageSize))
	h.o = &overlay.Overlay{Header: &overlay.Header{Version: overlay.Version, ChunkSize: pageSize, MemorySize: uint64(pages * pageSize)}}
	h.base = &overlay.Base{Index: &overlay.Index{ChunkSize: pageSize}}
	h.orig[overlay.Memory] = make([]overlay.Digest, pages)
	for i := range pages {
		h.orig[overlay.Memory][i] = sha256.Sum256(marked(byte(i + 1)))
	}
	for _, img := range overlay.Images {
		h.have[img] = append([]overlay.Digest(nil), h.orig[img]...)
		h.where[img] = make([]int32, len(h.orig[img]))
		for i := range h.where[img] {
			h.where[img][i] = -1
		}
	}
	var err error
	if h.mem, err = os.Create(filepath.Join(dir, "memory")); err != nil {
		t.Fatal(err)
	}
	h.mem.Truncate(int64(pages * pageSize))
	if h.segFile, err = os.Create(filepath.Join(dir, "segments")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.mem.Close(); h.segFile.Close() })
	h.pushQ = make(chan pushed, 100)
	h.pushErr = make(chan error, 1)
	return h
}

func marked(b byte) []byte {
	p := make([]byte, pageSize)
	p[0] = b
	return p
}

// Pages that change while they wait to go ahead, or after, end in the
// layer as they last were: a page turned back into the overlay's own, or
// into zeros, is not carried by a segment sent ahead, and the layer
// reads back.
func TestLayerHoldsEachPageAsItLastWas(t *testing.T) {
	h := newTestSender(t, 16)
	page := func(i int, data []byte) {
		t.Helper()
		if err := h.page(int64(i*pageSize), data); err != nil {
			t.Fatal(err)
		}
	}
	page(0, marked(0xaa)) // gathered to go ahead
	page(0, nil)          // then zeros, before the segment is sealed
	page(1, marked(0xbb))
	page(1, marked(2)) // back to the overlay's own
	page(2, marked(0xcc))
	page(3, marked(0xdd))
	page(4, marked(0xee))
	page(5, marked(0xff)) // the fourth gathered: sealed, pushed
	page(6, marked(0x33))
	page(7, marked(0x44))
	page(8, marked(0x55))
	page(9, marked(0x66)) // the second segment pushed
	page(7, marked(0x11)) // changed after it went ahead
	h.stop()
	page(10, marked(0x22)) // changed once QEMU stopped the VM
	if len(h.segs) != 2 || len(h.segs[0].chunks) != 4 {
		t.Fatalf("pushed %d segments, the first with %d chunks; want 2 of 4", len(h.segs), len(h.segs[0].chunks))
	}
	res, err := h.writeLayer([]byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(res.Layer)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	o, err := overlay.Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	// The first segment went ahead and is of use; the second is not, one
	// of its chunks having changed since.
	if len(o.Manifest.Segments) < 2 || o.Manifest.Segments[0].SHA != h.segs[0].sha {
		t.Fatal("the layer does not carry the first segment sent ahead")
	}
	for _, seg := range o.Manifest.Segments {
		if seg.SHA == h.segs[1].sha {
			t.Fatal("the layer carries a segment sent ahead whose chunk changed since")
		}
	}
	// The layer's memory, chunk by chunk.
	for i, want := range map[int]byte{0: 0, 1: 2, 2: 0xcc, 3: 0xdd, 4: 0xee, 5: 0xff, 6: 0x33, 7: 0x11, 8: 0x55, 9: 0x66, 10: 0x22, 11: 12} {
		r := o.Manifest.Refs[overlay.Memory][i]
		var got byte
		switch r.Kind {
		case overlay.Zero:
		case overlay.ParentMemory:
			got = byte(r.Index + 1)
		case overlay.Data:
			seg := o.Manifest.SegmentOf(int(r.Index))
			raw, err := o.ReadSegment(seg)
			if err != nil {
				t.Fatal(err)
			}
			got = raw[(int(r.Index)-o.Manifest.Segments[seg].First)*pageSize]
		default:
			t.Fatalf("memory chunk %d is a %v reference", i, r.Kind)
		}
		if got != want {
			t.Errorf("memory chunk %d holds %#x, want %#x", i, got, want)
		}
	}
}
