package overlay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const testChunk = 4096

// newBase indexes a base held in memory.
func newBase(t testing.TB, disk, mem []byte) *Base {
	t.Helper()
	idx := &Index{ChunkSize: testChunk, Sizes: [2]int64{int64(len(disk)), int64(len(mem))}}
	var parts []Part
	for img, b := range [][]byte{disk, mem} {
		sum, hs, err := HashImage(bytes.NewReader(b), int64(len(b)), testChunk, 2, nil)
		if err != nil {
			t.Fatal(err)
		}
		idx.Hashes[img] = hs
		parts = append(parts, Part{Name: Image(img).String(), Size: int64(len(b)), SHA: sum})
	}
	return &Base{ID: BaseID(parts), Images: [2]io.ReaderAt{bytes.NewReader(disk), bytes.NewReader(mem)}, Index: idx}
}

// pair makes a random base and a custom VM derived from it. Every kind of
// reference occurs: zero chunks, base chunks at the same and at other
// offsets in either image, repeats of new data, and new data. The sizes are
// not whole chunks, and the custom images differ in size from the base's.
func pair(rng *rand.Rand, baseDisk, baseMem, custDisk, custMem int) (bd, bm, cd, cm []byte) {
	fill := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	bd, bm = fill(baseDisk), fill(baseMem)
	// a few zero chunks in the base too
	clear(bm[:min(len(bm), testChunk)])
	derive := func(base []byte, n int) []byte {
		c := make([]byte, n)
		copy(c, base)
		var news [][]byte
		for off := 0; off < n; off += testChunk {
			end := min(off+testChunk, n)
			switch rng.IntN(8) {
			case 0: // zero
				clear(c[off:end])
			case 1: // a base disk chunk from anywhere
				src := rng.IntN(len(bd)/testChunk) * testChunk
				copy(c[off:end], bd[src:])
			case 2: // a base memory chunk from anywhere
				src := rng.IntN(len(bm)/testChunk) * testChunk
				copy(c[off:end], bm[src:])
			case 3: // new data, maybe repeated later
				d := fill(testChunk)
				news = append(news, d)
				copy(c[off:end], d)
			case 4: // a repeat of new data
				if len(news) > 0 {
					copy(c[off:end], news[rng.IntN(len(news))])
				}
			}
			// otherwise: unchanged from the base at the same offset (or
			// zero past the base's end)
		}
		return c
	}
	return bd, bm, derive(bd, custDisk), derive(bm, custMem)
}

// build writes the overlay of (cd, cm) against base into dir.
func build(t testing.TB, dir string, base *Base, cd, cm []byte, opt BuildOptions) (string, *Summary) {
	t.Helper()
	in := &Input{
		Images:   [2]io.ReaderAt{bytes.NewReader(cd), bytes.NewReader(cm)},
		Sizes:    [2]int64{int64(len(cd)), int64(len(cm))},
		State:    []byte("device state"),
		VMConfig: []byte(`{"machine":"q35"}`),
	}
	out := filepath.Join(dir, "vm.overlay")
	sum, err := Build(out, base, in, opt)
	if err != nil {
		t.Fatal(err)
	}
	return out, sum
}

func openFile(t testing.TB, path string) *Overlay {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, _ := f.Stat()
	o, err := Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestBuildExtractRoundTrip(t *testing.T) {
	const c = testChunk
	cases := []struct{ bd, bm, cd, cm int }{
		{64 * c, 48 * c, 64 * c, 48 * c},                         // same sizes, whole chunks
		{64*c + 100, 48*c + 7, 64*c + 100, 48*c + 7},             // partial last chunks
		{64 * c, 48 * c, 90*c + 333, 70*c + 1},                   // custom larger
		{64*c + 5, 48 * c, 20*c + 1, 11 * c},                     // custom smaller
		{10 * c, 10 * c, 0, 30*c + 9},                            // empty custom disk
		{3*c + 1, 2*c + 2, 1, c - 1},                             // tiny images
		{200 * c, 8 * c, 150*c + c/2, 300*c + 3},                 // memory grows a lot
		{32 * c, 32 * c, 32 * c, 32 * c},                         // run again with other seeds
		{17*c + 4095, 9*c + 1, 17*c + 4095, 9*c + 1},             // one byte short of whole
		{128 * c, 128 * c, 128*c + 4096*3 + 1, 128*c - 4096 + 1}, // odd growth
	}
	// And random ones: any size, bigger or smaller than the base.
	gen := rand.New(rand.NewPCG(42, 42))
	size := func() int { return 1 + gen.IntN(100)*c + gen.IntN(2)*gen.IntN(c) }
	for range 12 {
		cases = append(cases, struct{ bd, bm, cd, cm int }{size() + c, size() + c, size() - 1, size() - 1})
	}
	var seen [numKinds]int
	for n, tc := range cases {
		for _, codec := range []Codec{CodecXZ, CodecZstd} {
			t.Run(fmt.Sprintf("%d/%v", n, codec), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(n), uint64(codec)))
				bd, bm, cd, cm := pair(rng, tc.bd, tc.bm, tc.cd, tc.cm)
				base := newBase(t, bd, bm)
				dir := t.TempDir()
				path, sum := build(t, dir, base, cd, cm, BuildOptions{Codec: codec, SegmentSize: (1 + n%5) * 3 * c})
				o := openFile(t, path)
				if err := o.Verify(2, nil); err != nil {
					t.Fatal(err)
				}
				out := filepath.Join(dir, "out")
				if err := Extract(o, base, out, 3, nil); err != nil {
					t.Fatal(err)
				}
				for name, want := range map[string][]byte{DiskFile: cd, MemoryFile: cm, StateFile: []byte("device state"), VMConfigFile: []byte(`{"machine":"q35"}`)} {
					got, err := os.ReadFile(filepath.Join(out, name))
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, want) {
						t.Fatalf("%s: extracted %d bytes differ from the %d given", name, len(got), len(want))
					}
				}
				// The segments carry exactly the data chunks, in stream order.
				var segBytes, dataBytes []byte
				for i := range o.Manifest.Segments {
					raw, err := o.ReadSegment(i)
					if err != nil {
						t.Fatal(err)
					}
					segBytes = append(segBytes, raw...)
				}
				imgs := [2][]byte{cd, cm}
				for pos, id := range o.Manifest.Order {
					if r := o.Manifest.Refs[id.Image][id.Index]; r.Kind != Data || int(r.Index) != pos {
						t.Fatalf("order entry %d is %v, a %v chunk", pos, id, r.Kind)
					}
					off := int64(id.Index) * c
					dataBytes = append(dataBytes, imgs[id.Image][off:off+o.Header.ChunkLen(id)]...)
				}
				if !bytes.Equal(segBytes, dataBytes) {
					t.Fatalf("segments hold %d bytes, data chunks %d", len(segBytes), len(dataBytes))
				}
				if sum.DataBytes != int64(len(dataBytes)) {
					t.Fatalf("summary says %d data bytes, segments hold %d", sum.DataBytes, len(dataBytes))
				}
				counts := o.Manifest.Counts()
				if counts != sum.Counts {
					t.Fatalf("summary counts %v, manifest %v", sum.Counts, counts)
				}
				for _, img := range Images {
					for k, n := range counts[img] {
						seen[k] += n
					}
				}
			})
		}
	}
	for k, n := range seen {
		if n == 0 && Kind(k) < ParentDisk { // TestLayeredRoundTrip has the parent kinds
			t.Errorf("no chunk of kind %v was exercised", Kind(k))
		}
	}
}

// A layer built on a parent carries only what differs from the parent's
// VM and extracts, with the parent's images, to the VM it was built from.
func TestLayeredRoundTrip(t *testing.T) {
	for n := range 6 {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(n), 77))
			bd, bm, pd, pm := pair(rng, 64*testChunk, 48*testChunk, 70*testChunk+5, 40*testChunk)
			base := newBase(t, bd, bm)
			dir := t.TempDir()
			pout, _ := build(t, dir, base, pd, pm, BuildOptions{Codec: CodecZstd})
			parent := openFile(t, pout)
			// The child: the parent's VM with some chunks changed, some
			// moved within the parent, and a different size.
			_, _, cd, cm := pair(rng, len(pd), len(pm), len(pd)+n*testChunk, len(pm)-n)
			copy(cd, pd)
			copy(cm, pm[:min(len(pm), len(cm))])
			for i := range 5 {
				copy(cd[(10+i)*testChunk:], pd[(60-i)*testChunk:(61-i)*testChunk])
				copy(cm[(3+i)*testChunk:], rngChunk(rng))
			}
			var ph ParentHashes
			ph.Parent = Parent{ID: parent.ID, Location: "parent.overlay"}
			for img, b := range [][]byte{pd, pm} {
				_, hs, err := HashImage(bytes.NewReader(b), int64(len(b)), testChunk, 2, nil)
				if err != nil {
					t.Fatal(err)
				}
				ph.Hashes[img] = hs
			}
			cdir := t.TempDir()
			cout, sum := build(t, cdir, base, cd, cm, BuildOptions{Codec: CodecXZ, Parent: &ph})
			if sum.Counts[Disk][ParentDisk] == 0 || sum.Counts[Memory][ParentMemory] == 0 {
				t.Fatalf("no parent references: %v", sum.Counts)
			}
			if max := int64(7+n) * testChunk; sum.DataBytes > max { // 5 new chunks, the two cut-off last chunks, the disk's growth
				t.Fatalf("the layer carries %d bytes of data, more than the %d that are new", sum.DataBytes, max)
			}
			child := openFile(t, cout)
			if child.Header.Version != LayeredVersion || child.Manifest.Parent == nil || *child.Manifest.Parent != ph.Parent {
				t.Fatalf("version %d, parent %+v", child.Header.Version, child.Manifest.Parent)
			}
			out := filepath.Join(cdir, "out")
			if err := Extract(child, base, out, 2, nil); err == nil || !strings.Contains(err.Error(), "parent must be resolved") {
				t.Fatalf("extract without the parent: %v", err)
			}
			child.SetParentImages([2]io.ReaderAt{bytes.NewReader(pd), bytes.NewReader(pm)})
			if err := child.CheckParent(parent); err != nil {
				t.Fatal(err)
			}
			if err := child.CheckParent(child); err == nil {
				t.Fatal("CheckParent took the layer for its own parent")
			}
			if err := Extract(child, base, out, 2, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := Reorder(filepath.Join(cdir, "re.overlay"), child, base, nil, BuildOptions{Codec: CodecZstd}); !errors.Is(err, errLayered) {
				t.Fatalf("reorder of a layered overlay: %v", err)
			}
			for name, want := range map[string][]byte{DiskFile: cd, MemoryFile: cm} {
				got, err := os.ReadFile(filepath.Join(out, name))
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("%s differs (%v)", name, err)
				}
			}
		})
	}
}

func rngChunk(rng *rand.Rand) []byte {
	b := make([]byte, testChunk)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestBuildFollowsOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	bd, bm, cd, cm := pair(rng, 64*testChunk, 64*testChunk, 64*testChunk, 64*testChunk)
	base := newBase(t, bd, bm)
	dir := t.TempDir()
	// Without an order: memory chunks by offset, then disk chunks.
	path, _ := build(t, dir, base, cd, cm, BuildOptions{Codec: CodecZstd})
	def := openFile(t, path).Manifest.Order
	for i := 1; i < len(def); i++ {
		a, b := def[i-1], def[i]
		if !(a.Image == b.Image && a.Index < b.Index || a.Image == Memory && b.Image == Disk) {
			t.Fatalf("default order has %v before %v", a, b)
		}
	}
	// With an order: the named data chunks first, in that order.
	var want []ChunkID
	for i := len(def) - 1; i >= 0; i -= 3 {
		want = append(want, def[i])
	}
	order := append([]ChunkID{{Disk, 0}}, want...) // disk 0 may well be a base chunk; it is skipped if so
	path, _ = build(t, dir, base, cd, cm, BuildOptions{Codec: CodecZstd, Order: append(order, want...)})
	got := openFile(t, path).Manifest.Order
	start := 0
	if got[0] == (ChunkID{Disk, 0}) {
		start = 1
	}
	for i, c := range want {
		if got[start+i] != c {
			t.Fatalf("stream position %d holds %v, want %v", start+i, got[start+i], c)
		}
	}
}

// The summary says what became of each changed chunk: zeroed, found in the
// base elsewhere, repeated in the VM, or carried as data; unchanged chunks
// are not counted.
func TestSummaryChangedCounts(t *testing.T) {
	fill := func(seed byte) []byte {
		b := make([]byte, testChunk)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	const n = 8
	bd, bm := make([]byte, n*testChunk), make([]byte, n*testChunk)
	for i := range n {
		copy(bd[i*testChunk:], fill(byte(i+1)))
		copy(bm[i*testChunk:], fill(byte(i+101)))
	}
	base := newBase(t, bd, bm)
	cd, cm := bytes.Clone(bd), bytes.Clone(bm)
	clear(cd[0:testChunk])                              // zeroed (a discard)
	clear(cd[1*testChunk : 2*testChunk])                // zeroed
	copy(cd[2*testChunk:], bm[5*testChunk:6*testChunk]) // from the base memory
	copy(cd[3*testChunk:], fill(201))                   // new data
	copy(cm[4*testChunk:], fill(201))                   // the same new data again
	copy(cm[6*testChunk:], fill(202))                   // new data
	_, sum := build(t, t.TempDir(), base, cd, cm, BuildOptions{Codec: CodecZstd})
	var by [numKinds]int
	for _, img := range Images {
		for k, c := range sum.ChangedCounts[img] {
			by[k] += c
		}
	}
	want := [numKinds]int{Zero: 2, BaseMemory: 1, Self: 1, Data: 2}
	if by != want {
		t.Fatalf("changed chunks by kind %v, want %v", by, want)
	}
	if sum.ChangedBytes != 6*testChunk {
		t.Fatalf("changed bytes %d, want %d", sum.ChangedBytes, 6*testChunk)
	}
}
