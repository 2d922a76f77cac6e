package store

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

func writeRandom(t *testing.T, path string, n int, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestRegistry(t *testing.T) {
	dir := t.TempDir()
	files := ImportFiles{Disk: filepath.Join(dir, "disk"), Memory: filepath.Join(dir, "mem"), State: filepath.Join(dir, "state")}
	// Enough chunks for the index to span several stored blocks.
	writeRandom(t, files.Disk, (2*hashesPerBlock+5)*512+7, 1)
	writeRandom(t, files.Memory, 3*512, 2)
	writeRandom(t, files.State, 10, 3)

	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.Import("b1", files, 512, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A second holder of the registry waits, then gives up clearly.
	defer func(w time.Duration) { LockWait = w }(LockWait)
	LockWait = 50 * time.Millisecond
	if _, err := Open(filepath.Join(dir, "st"), zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "another cloudletfs process") {
		t.Fatalf("second open of a state dir: %v", err)
	}
	for _, ref := range []string{"b1", b.ID.String(), b.ID.String()[:8]} {
		got, err := s.Resolve(ref)
		if err != nil || got.ID != b.ID {
			t.Fatalf("Resolve(%q) = %v, %v", ref, got, err)
		}
	}
	if _, err := s.Resolve("b2"); err == nil || !strings.Contains(err.Error(), "not in the registry") {
		t.Fatalf("Resolve of an unknown base: %v", err)
	}

	// The index survives a reopen and matches a fresh hash of the files.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(filepath.Join(dir, "st"), zerolog.Nop()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	idx, err := s.Index(b)
	if err != nil {
		t.Fatal(err)
	}
	for img, path := range []string{files.Disk, files.Memory} {
		f, _ := os.Open(path)
		st, _ := f.Stat()
		_, want, err := overlay.HashImage(f, st.Size(), 512, 2, nil)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(idx.Hashes[img]) != len(want) {
			t.Fatalf("%s index has %d chunks, want %d", overlay.Image(img), len(idx.Hashes[img]), len(want))
		}
		for i := range want {
			if idx.Hashes[img][i] != want[i] {
				t.Fatalf("%s chunk %d: index differs from the file", overlay.Image(img), i)
			}
		}
	}
	if err := b.Verify(nil); err != nil {
		t.Fatal(err)
	}

	if err := s.Remove(b); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve("b1"); err == nil {
		t.Fatal("removed base still resolves")
	}
	if _, err := s.Index(b); err == nil {
		t.Fatal("removed base still has an index")
	}
	// The name is free again.
	if _, err := s.Import("b1", files, 512, 2, nil); err != nil {
		t.Fatal(err)
	}
}

func TestCacheGC(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ids []overlay.Digest
	for i := range 3 {
		id := overlay.Digest{byte(i + 1)}
		c, err := s.OpenCache(id, 4096, [2]int64{1 << 20, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, 4096)
		data[0] = 1
		var chunks []ChunkData
		for j := range 64 { // 256 KiB each
			chunks = append(chunks, ChunkData{ID: overlay.ChunkID{Image: overlay.Disk, Index: uint32(j)}, Data: data})
		}
		if err := c.WriteSegment(0, chunks); err != nil {
			t.Fatal(err)
		}
		if err := c.PutCow(overlay.ChunkID{Image: overlay.Memory, Index: 1}, data); err != nil {
			t.Fatal(err)
		}
		c.Close()
		ids = append(ids, id)
	}
	ents, err := s.Caches()
	if err != nil || len(ents) != 3 || ents[0].ID != ids[0] || ents[0].Bytes < 256<<10 {
		t.Fatalf("caches: %+v %v", ents, err)
	}
	// Room for two caches. Kept caches and mounted ones never go, even
	// over the cap; otherwise the least recently used goes first.
	freed, err := s.GC(ents[2].Bytes+ents[1].Bytes, ids...)
	if err != nil || freed != 0 {
		t.Fatalf("kept caches were freed: %d %v", freed, err)
	}
	held, err := s.OpenCache(ids[0], 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if now, _ := s.Caches(); len(now) != 3 || now[2].ID != ids[0] || !now[2].Mounted || now[0].Mounted || now[1].Mounted {
		t.Fatalf("opening a cache makes it the most recently used and mounted: %+v", now)
	}
	if freed, err = s.GC(0); err != nil || freed != ents[1].Bytes+ents[2].Bytes {
		t.Fatalf("GC(0) freed %d, want all but the mounted cache (%v)", freed, err)
	}
	if err := s.RemoveCache(ids[0]); !errors.Is(err, ErrInUse) {
		t.Fatalf("removing a mounted cache: %v", err)
	}
	held.Close()
	// Bring the two removed caches back for the next checks.
	for _, id := range ids[1:] {
		c, err := s.OpenCache(id, 4096, [2]int64{1 << 20, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		c.WriteSegment(0, []ChunkData{{ID: overlay.ChunkID{Image: overlay.Disk}, Data: make([]byte, 4096)}})
		c.Close()
	}
	if ents, err = s.Caches(); err != nil || len(ents) != 3 || ents[0].ID != ids[0] {
		t.Fatalf("caches: %+v %v", ents, err)
	}
	freed, err = s.GC(ents[2].Bytes+ents[1].Bytes, ids[1])
	if err != nil || freed != ents[0].Bytes {
		t.Fatalf("freed %d, want %d (%v)", freed, ents[0].Bytes, err)
	}
	left, _ := s.Caches()
	if len(left) != 2 || left[0].ID != ids[1] {
		t.Fatalf("left: %+v", left)
	}
	// The removed cache starts empty; its written data is still there.
	c, err := s.OpenCache(ids[0], 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if segs, _ := c.Segments(); len(segs) != 0 {
		t.Fatalf("segments of a removed cache: %v", segs)
	}
	buf := make([]byte, 4096)
	if ok, err := c.Cow(overlay.ChunkID{Image: overlay.Memory, Index: 1}, buf); !ok || err != nil || buf[0] != 1 {
		t.Fatalf("written data lost with the cache: %v %v", ok, err)
	}
}

// A cached chunk that changes on disk after its segment was marked is found
// by Verify, and its segment is forgotten.
func TestCacheVerify(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{9}
	sizes := [2]int64{3*4096 + 100, 4096}
	c, err := s.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	chunk := func(img overlay.Image, idx uint32, n int, b byte) ChunkData {
		return ChunkData{ID: overlay.ChunkID{Image: img, Index: idx}, Data: bytes.Repeat([]byte{b}, n)}
	}
	// The second segment ends with the disk's short last chunk.
	if err := c.WriteSegment(0, []ChunkData{chunk(overlay.Disk, 0, 4096, 1), chunk(overlay.Memory, 0, 4096, 2)}); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteSegment(1, []ChunkData{chunk(overlay.Disk, 2, 4096, 3), chunk(overlay.Disk, 3, 100, 4)}); err != nil {
		t.Fatal(err)
	}
	if checked, bad, err := c.Verify(); checked != 2 || len(bad) != 0 || err != nil {
		t.Fatalf("clean cache: checked %d, bad %v, %v", checked, bad, err)
	}
	if _, _, err := s.VerifyCache(id); !errors.Is(err, ErrInUse) {
		t.Fatalf("verifying a mounted cache: %v", err)
	}
	c.Close()
	f, err := os.OpenFile(filepath.Join(s.Dir(), "cache", id.String(), "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{7}, 3*4096+50)
	f.Close()
	if checked, bad, err := s.VerifyCache(id); checked != 2 || !slices.Equal(bad, []int{1}) || err != nil {
		t.Fatalf("damaged cache: checked %d, bad %v, %v", checked, bad, err)
	}
	c, err = s.OpenCache(id, 4096, sizes)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if segs, _ := c.Segments(); !slices.Equal(segs, []int{0}) {
		t.Fatalf("segments after verify: %v", segs)
	}
}

// Data written through mounts that an older state dir kept in the registry
// moves into the overlay's own database when the overlay is next opened.
func TestOldWrittenDataMoves(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{7}
	chunk := bytes.Repeat([]byte{5}, 4096)
	err = s.db.Update(func(txn *badger.Txn) error {
		k := append(append([]byte("cow/"), id[:]...), byte(overlay.Memory), 0, 0, 0, 3)
		if err := txn.Set(k, chunk); err != nil {
			return err
		}
		return txn.Set(append(append([]byte("seg/"), id[:]...), 0, 0, 0, 1), nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.OpenCache(id, 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, 4096)
	if ok, err := c.Cow(overlay.ChunkID{Image: overlay.Memory, Index: 3}, got); !ok || err != nil || !bytes.Equal(got, chunk) {
		t.Fatalf("written chunk after the move: %v %v", ok, err)
	}
	if segs, _ := c.Segments(); len(segs) != 0 {
		t.Fatalf("old segment markers kept: %v", segs)
	}
	s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: append([]byte("cow/"), id[:]...)})
		defer it.Close()
		if it.Rewind(); it.Valid() {
			t.Error("the registry still holds the written chunk")
		}
		return nil
	})
}

// Chunks that state dirs before the written-data files kept whole in the
// overlay's database move into the files when the overlay is next opened,
// and the database keeps only their markers.
func TestWrittenChunksMoveToFiles(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{5}
	open := cacheOpener(t, s, id, 1<<20)
	c := open()
	chunk := bytes.Repeat([]byte{0x6b}, 4096)
	if err := c.db.Update(func(txn *badger.Txn) error { return txn.Set(cowKey(overlay.Disk, 7), chunk) }); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open()
	defer c.Close()
	got := make([]byte, 4096)
	if ok, err := c.Cow(overlay.ChunkID{Image: overlay.Disk, Index: 7}, got); !ok || err != nil || !bytes.Equal(got, chunk) {
		t.Fatalf("written chunk after the move: %v %v", ok, err)
	}
	err = c.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(cowKey(overlay.Disk, 7))
		if err != nil {
			return err
		}
		if it.ValueSize() != int64(len(writtenMark)) {
			t.Errorf("the database still holds %d bytes for the moved chunk", it.ValueSize())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A chunk that a state dir before the written-data files kept whole in the
// database is told from a marker by its length even when it is one byte
// long, the last chunk of an image one byte past a whole chunk, and moves
// into the file like any other.
func TestOneByteChunkMovesToFiles(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{16}
	open := cacheOpener(t, s, id, 3*4096+1)
	c := open()
	last := overlay.ChunkID{Image: overlay.Disk, Index: 3}
	if err := c.db.Update(func(txn *badger.Txn) error { return txn.Set(cowKey(last.Image, last.Index), []byte{0xab}) }); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Such state dirs have no written-data files.
	if err := os.RemoveAll(s.writtenDir(id)); err != nil {
		t.Fatal(err)
	}
	c = open()
	got := []byte{0}
	if ok, err := c.Cow(last, got); !ok || err != nil || got[0] != 0xab {
		t.Fatalf("one-byte last chunk after the move: written %v, %v, byte %#x, want 0xab", ok, err, got[0])
	}
	c.Close()
	// Its marker, a byte too, is now a marker.
	c = open()
	defer c.Close()
	if ok, err := c.Cow(last, got); !ok || err != nil || got[0] != 0xab {
		t.Fatalf("one-byte last chunk after a reopen: written %v, %v, byte %#x, want 0xab", ok, err, got[0])
	}
}

// cacheOpener returns what opens overlay id's cache in s, with a disk image
// of diskSize bytes and a 1 MiB memory image: a test closes and opens it
// again to see what a remount sees.
func cacheOpener(t *testing.T, s *Store, id overlay.Digest, diskSize int64) func() *Cache {
	t.Helper()
	return func() *Cache {
		t.Helper()
		c, err := s.OpenCache(id, 4096, [2]int64{diskSize, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
}
