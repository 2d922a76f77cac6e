package store

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// A discarded chunk is a marker that reads as zeros, kept across a reopen,
// and a write over it makes it a written chunk again.
func TestDiscardCow(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	s, err := Open(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	open := func() *Cache {
		c, err := s.OpenCache(overlay.Digest{9}, 4096, [2]int64{1 << 20, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := open()
	data := bytes.Repeat([]byte{7}, 4096)
	a, b := overlay.ChunkID{Image: overlay.Disk, Index: 1}, overlay.ChunkID{Image: overlay.Memory, Index: 2}
	for _, id := range []overlay.ChunkID{a, b} {
		if err := c.PutCow(id, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DiscardCows([]overlay.ChunkID{b}); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open()
	defer c.Close()
	got := bytes.Repeat([]byte{1}, 4096)
	if ok, err := c.Cow(b, got); !ok || err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("a discarded chunk reads %v %v, not zeros", ok, err)
	}
	if all, _ := c.CowChunks(); len(all) != 2 {
		t.Fatalf("written chunks %v, want both", all)
	}
	if zero, err := c.DiscardedChunks(); err != nil || len(zero) != 1 || zero[0] != b {
		t.Fatalf("discarded chunks %v (%v), want %v", zero, err, b)
	}
	if err := c.PutCow(b, data); err != nil {
		t.Fatal(err)
	}
	if zero, _ := c.DiscardedChunks(); len(zero) != 0 {
		t.Fatalf("a chunk written after its discard is still listed as discarded: %v", zero)
	}
}

// A discard larger than Badger takes in one transaction (a guest's fstrim
// of a whole disk) is recorded whole, across a reopen.
func TestDiscardCowsLarge(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	s, err := Open(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 300_000 // over 1 GiB of 4 KiB chunks
	open := func() *Cache {
		c, err := s.OpenCache(overlay.Digest{8}, 4096, [2]int64{n * 4096, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := open()
	ids := make([]overlay.ChunkID, n)
	for i := range ids {
		ids[i] = overlay.ChunkID{Image: overlay.Disk, Index: uint32(i)}
	}
	if err := c.DiscardCows(ids); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open()
	defer c.Close()
	if zero, err := c.DiscardedChunks(); err != nil || len(zero) != n {
		t.Fatalf("%d discard markers after a reopen (%v), want %d", len(zero), err, n)
	}
}
