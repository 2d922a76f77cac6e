package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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
	open := cacheOpener(t, s, overlay.Digest{9}, 1<<20)
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
	open := cacheOpener(t, s, overlay.Digest{8}, n*4096)
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

// A discard whose hole punch fails (a state dir without hole punching, an
// I/O error) still took effect: its markers make the chunks read as zeros,
// so it succeeds, is logged once, and the chunks read as zeros after a
// reopen too. The punch fails at a seam: tmpfs and ext4 both punch.
func TestDiscardPunchFails(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	var log bytes.Buffer
	s, err := Open(dir, zerolog.New(&log).Level(zerolog.InfoLevel))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	defer func(p func(*os.File, int64, int64) error) { punchHole = p }(punchHole)
	punchHole = func(*os.File, int64, int64) error { return syscall.EOPNOTSUPP }
	open := cacheOpener(t, s, overlay.Digest{13}, 1<<20)
	c := open()
	data := bytes.Repeat([]byte{7}, 4096)
	ids := []overlay.ChunkID{{Image: overlay.Disk, Index: 1}, {Image: overlay.Disk, Index: 4}}
	for _, id := range ids {
		if err := c.PutCow(id, data); err != nil {
			t.Fatal(err)
		}
		if err := c.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := c.DiscardCows([]overlay.ChunkID{id}); err != nil {
			t.Fatalf("discarding %v where holes cannot be punched: %v", id, err)
		}
	}
	check := func(when string) {
		t.Helper()
		for _, id := range ids {
			got := bytes.Repeat([]byte{1}, 4096)
			if ok, err := c.Cow(id, got); !ok || err != nil || !bytes.Equal(got, make([]byte, 4096)) {
				t.Fatalf("%s: discarded chunk %v reads %v %v, not zeros", when, id, ok, err)
			}
		}
		if zero, _ := c.DiscardedChunks(); len(zero) != len(ids) {
			t.Fatalf("%s: discarded chunks %v, want %v", when, zero, ids)
		}
	}
	check("after the discards")
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open()
	defer c.Close()
	check("after a reopen")
	if n := strings.Count(log.String(), "could not punch"); n != 1 {
		t.Fatalf("%d warnings about failed punches, want 1:\n%s", n, log.String())
	}
}

// A discard whose markers take several transactions and fail part way
// reports how many chunks it discarded, and those are the chunks that read
// as zeros, now and after a reopen: the store and its caller agree. The
// second transaction fails at a seam.
func TestDiscardFailsPartWay(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	s, err := Open(dir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 50_000 // several transactions of markers
	open := cacheOpener(t, s, overlay.Digest{14}, n*4096)
	c := open()
	ids := make([]overlay.ChunkID, n)
	for i := range ids {
		ids[i] = overlay.ChunkID{Image: overlay.Disk, Index: uint32(i)}
	}
	txns := 0
	c.txnHook = func() error {
		if txns++; txns == 2 {
			return syscall.EIO
		}
		return nil
	}
	err = c.DiscardCows(ids)
	var part *DiscardError
	if !errors.As(err, &part) || !errors.Is(err, syscall.EIO) || part.Done <= 0 || part.Done >= n {
		t.Fatalf("a discard failing in its second transaction: %v, want a DiscardError wrapping EIO with part of %d done", err, n)
	}
	check := func(when string) {
		t.Helper()
		zero, _ := c.DiscardedChunks()
		if len(zero) != part.Done || zero[0] != ids[0] || zero[len(zero)-1] != ids[part.Done-1] {
			t.Fatalf("%s: %d chunks discarded, want the first %d", when, len(zero), part.Done)
		}
	}
	check("after the discard")
	c.txnHook = nil
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c = open()
	defer c.Close()
	check("after a reopen")
}

// A written-data file that is gone (removed by hand) is made anew, and the
// markers of the chunks it held go with it, logged as lost writes: those
// chunks are no longer written, rather than read as the new file's holes.
// The other image's written chunks, and discarded chunks, stay.
func TestWrittenFileGone(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	var log bytes.Buffer
	s, err := Open(dir, zerolog.New(&log).Level(zerolog.InfoLevel))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := overlay.Digest{15}
	open := cacheOpener(t, s, id, 1<<20)
	c := open()
	data := bytes.Repeat([]byte{7}, 4096)
	lost, kept, zero := overlay.ChunkID{Image: overlay.Disk, Index: 1}, overlay.ChunkID{Image: overlay.Memory, Index: 1}, overlay.ChunkID{Image: overlay.Disk, Index: 2}
	for _, ch := range []overlay.ChunkID{lost, kept, zero} {
		if err := c.PutCow(ch, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.DiscardCows([]overlay.ChunkID{zero}); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := os.Remove(filepath.Join(s.writtenDir(id), overlay.Disk.String())); err != nil {
		t.Fatal(err)
	}
	c = open()
	defer c.Close()
	buf := make([]byte, 4096)
	if ok, err := c.Cow(lost, buf); ok || err != nil {
		t.Fatalf("a chunk whose written-data file is gone reads as written (%v), as %d nonzero bytes", err, len(bytes.Trim(buf, "\x00")))
	}
	if ok, err := c.Cow(kept, buf); !ok || err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("a chunk of the other image: written %v, %v", ok, err)
	}
	if d, _ := c.DiscardedChunks(); len(d) != 1 || d[0] != zero {
		t.Fatalf("discarded chunks %v, want %v", d, zero)
	}
	if !strings.Contains(log.String(), `"level":"error"`) || !strings.Contains(log.String(), "is lost") {
		t.Fatalf("no error says the written data is lost:\n%s", log.String())
	}
}
