package overlay

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

func TestReorderKeepsTheVM(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	bd, bm, cd, cm := pair(rng, 80*testChunk+17, 60*testChunk, 90*testChunk+3, 50*testChunk+999)
	base := newBase(t, bd, bm)
	dir := t.TempDir()
	path, _ := build(t, dir, base, cd, cm, BuildOptions{Codec: CodecXZ, SegmentSize: 8 * testChunk})
	o := openFile(t, path)

	// A trace order: some data chunks from the end of the stream, some
	// chunks that are not data at all, in a scrambled order.
	var first []ChunkID
	for i := len(o.Manifest.Order) - 1; i >= 0; i -= 4 {
		first = append(first, o.Manifest.Order[i])
	}
	first = append(first, ChunkID{Disk, 0}, ChunkID{Memory, 1})
	rng.Shuffle(len(first), func(i, j int) { first[i], first[j] = first[j], first[i] })

	out := filepath.Join(dir, "re.overlay")
	if _, err := Reorder(out, o, base, first, BuildOptions{Codec: CodecZstd, SegmentSize: 3 * testChunk}); err != nil {
		t.Fatal(err)
	}
	r := openFile(t, out)
	if err := Extract(r, base, filepath.Join(dir, "x"), 2, nil); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]byte{DiskFile: cd, MemoryFile: cm} {
		got, _ := os.ReadFile(filepath.Join(dir, "x", name))
		if !bytes.Equal(got, want) {
			t.Fatalf("%s of the reordered overlay differs", name)
		}
	}
	// The chunks of the order that carry data come first, in that order.
	pos := 0
	for _, c := range first {
		if r.Manifest.Refs[c.Image][c.Index].Kind != Data {
			continue
		}
		if r.Manifest.Order[pos] != c {
			t.Fatalf("stream position %d holds %v, want %v", pos, r.Manifest.Order[pos], c)
		}
		pos++
	}
	if pos == 0 {
		t.Fatal("no chunk of the order carries data")
	}
	// A chunk of the order that repeats another never waits on a later
	// segment: what it repeats comes before it in the order.
	at := map[ChunkID]int{}
	for i, c := range first {
		if _, ok := at[c]; !ok {
			at[c] = i
		}
	}
	for _, c := range first {
		ref := r.Manifest.Refs[c.Image][c.Index]
		if ref.Kind != Self {
			continue
		}
		if p, ok := at[ChunkID{ref.Image, ref.Index}]; !ok || p > at[c] {
			t.Fatalf("%v repeats %v, which streams after it", c, ChunkID{ref.Image, ref.Index})
		}
	}
	if r.Header.BaseID != o.Header.BaseID || !bytes.Equal(r.State, o.State) {
		t.Fatal("reorder changed the base or the state")
	}
}
