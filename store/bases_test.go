package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// importTestBase writes a small base under dir and imports it as name.
func importTestBase(t *testing.T, s *Store, dir, name string, seed uint64) (*Base, ImportFiles) {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	files := ImportFiles{Disk: filepath.Join(dir, "disk.img"), Memory: filepath.Join(dir, "memory.img"), State: filepath.Join(dir, "state")}
	writeRandom(t, files.Disk, 64*512, seed)
	writeRandom(t, files.Memory, 16*512, seed+1)
	writeRandom(t, files.State, 10, seed+2)
	b, err := s.Import(name, files, 512, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	return b, files
}

// A base image changed, touched back or truncated under a reader gives
// errors, never other bytes or zeros.
func TestBaseChangedUnderReader(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b, files := importTestBase(t, s, filepath.Join(dir, "base"), "b", 1)
	orig, _ := os.ReadFile(files.Disk)
	st, _ := os.Stat(files.Disk)

	for _, tc := range []struct {
		name   string
		change func(t *testing.T)
	}{
		{"rewritten with its modification time set back", func(t *testing.T) {
			f, err := os.OpenFile(files.Disk, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte("other bytes"), 100)
			f.Close()
			os.Chtimes(files.Disk, st.ModTime(), st.ModTime())
		}},
		{"truncated", func(t *testing.T) { os.Truncate(files.Disk, 512) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(files.Disk, orig, 0o644); err != nil {
				t.Fatal(err)
			}
			os.Chtimes(files.Disk, st.ModTime(), st.ModTime())
			ob, closer, err := OpenImages(b)
			if err != nil {
				t.Fatal(err)
			}
			defer closer()
			buf := make([]byte, 512)
			if _, err := ob.Images[overlay.Disk].ReadAt(buf, 0); err != nil || !bytes.Equal(buf, orig[:512]) {
				t.Fatalf("read before the change: %v", err)
			}
			tc.change(t)
			n, err := ob.Images[overlay.Disk].ReadAt(buf, 0)
			if err == nil || !strings.Contains(err.Error(), "changed while in use") {
				t.Fatalf("read after the change: %d bytes, %v; want an error", n, err)
			}
			if _, err := ob.Images[overlay.Disk].ReadAt(buf, 30*512); err == nil {
				t.Fatal("a later read of the changed image succeeded")
			}
		})
	}
}

// `base verify` of a base whose files were touched records their new
// times, so the cheap check passes again, and keeps them after a reopen;
// a base whose content changed is not refreshed.
func TestVerifyRecordsNewTimes(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	b, files := importTestBase(t, s, filepath.Join(dir, "base"), "b", 1)
	later := time.Now().Add(time.Hour)
	os.Chtimes(files.Memory, later, later)
	if err := b.CheckFiles(); err == nil {
		t.Fatal("a touched base passed the cheap check")
	}
	if refreshed, err := s.Verify(b, nil); err != nil || !refreshed {
		t.Fatalf("verify of a touched base: refreshed %v, %v", refreshed, err)
	}
	if refreshed, err := s.Verify(b, nil); err != nil || refreshed {
		t.Fatalf("verify of a base already refreshed: refreshed %v, %v", refreshed, err)
	}
	s.Close()
	if s, err = Open(filepath.Join(dir, "st"), zerolog.Nop()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if b, err = s.Resolve("b"); err != nil {
		t.Fatal(err)
	}
	if err := b.CheckFiles(); err != nil {
		t.Fatalf("the new times were not kept: %v", err)
	}
	if _, closer, err := OpenImages(b); err != nil {
		t.Fatalf("opening a refreshed base: %v", err)
	} else {
		closer()
	}
	writeRandom(t, files.State, 10, 99)
	if refreshed, err := s.Verify(b, nil); err == nil || refreshed || !strings.Contains(err.Error(), "content changed") {
		t.Fatalf("verify of a changed base: refreshed %v, %v", refreshed, err)
	}
	if err := b.CheckFiles(); err == nil {
		t.Fatal("a changed base was refreshed")
	}
}

// A base cannot be removed while its images are open (a mount), and can
// be once they are closed.
func TestRemoveBaseInUse(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b, _ := importTestBase(t, s, filepath.Join(dir, "base"), "b", 1)
	_, closer, err := OpenImages(b)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(b); !errors.Is(err, ErrBaseInUse) || !strings.Contains(err.Error(), "mounted") {
		t.Fatalf("removing a base in use: %v", err)
	}
	if _, err := s.Resolve("b"); err != nil {
		t.Fatalf("a refused removal unregistered the base: %v", err)
	}
	closer()
	if err := s.Remove(b); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve("b"); err == nil {
		t.Fatal("the base is still registered")
	}
}

// Removing a base that `base create` made removes its directory in the
// state dir, with the kernel and initrd; an imported base's files, and a
// directory another base still uses, stay.
func TestRemoveOwnedFiles(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "st")
	s, err := Open(state, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	created := filepath.Join(state, "base-made-123")
	made, _ := importTestBase(t, s, created, "made", 1)
	os.WriteFile(filepath.Join(created, "vmlinuz"), []byte("kernel"), 0o644)
	imported, files := importTestBase(t, s, filepath.Join(dir, "elsewhere"), "imported", 10)
	// Made with an outside file: not owned whole.
	mixedDir := filepath.Join(state, "base-mixed-456")
	os.MkdirAll(mixedDir, 0o700)
	writeRandom(t, filepath.Join(mixedDir, "disk.img"), 64*512, 20)
	mixed, err := s.Import("mixed", ImportFiles{Disk: filepath.Join(mixedDir, "disk.img"), Memory: files.Memory, State: files.State}, 512, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		b    *Base
		want string
	}{{made, created}, {imported, ""}, {mixed, ""}} {
		if got, err := s.OwnedDir(tc.b); err != nil || got != tc.want {
			t.Fatalf("OwnedDir(%s) = %q, %v; want %q", tc.b.Name, got, err, tc.want)
		}
	}
	for _, b := range []*Base{made, imported, mixed} {
		if err := s.Remove(b); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(created); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the directory base create made is still there: %v", err)
	}
	for _, p := range []string{files.Disk, files.Memory, files.State, filepath.Join(mixedDir, "disk.img")} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("a file the state dir does not own went: %v", err)
		}
	}
}

// The cache that was closed last is the most recently used, whenever it
// was opened: a collection at unmount removes the others first.
func TestLastUsedAtClose(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	open := func(id overlay.Digest) *Cache {
		c, err := s.OpenCache(id, 4096, [2]int64{1 << 20, 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.WriteSegment(0, []ChunkData{{ID: overlay.ChunkID{Image: overlay.Disk}, Data: make([]byte, 4096)}}); err != nil {
			t.Fatal(err)
		}
		return c
	}
	long, short := overlay.Digest{1}, overlay.Digest{2}
	cl := open(long) // mounted first, for long
	cs := open(short)
	cs.Close()
	// Close records the time it was closed, to the clock's own precision:
	// the writes to the lock before it leave only the kernel's coarse
	// clock, which lags the time taken before Close. Three closes in a row
	// make a clock tick between the two times unlikely to hide it.
	for _, id := range []overlay.Digest{{3}, {4}, {5}} {
		c := open(id)
		before := time.Now()
		c.Close()
		ents, err := s.Caches()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if e.ID == id && e.LastUsed.Before(before) {
				t.Fatalf("cache closed after %s was last used at %s, before it was closed", before.Format(time.RFC3339Nano), e.LastUsed.Format(time.RFC3339Nano))
			}
		}
		if err := s.RemoveCache(id); err != nil {
			t.Fatal(err)
		}
	}
	cl.Close()
	ents, err := s.Caches()
	if err != nil || len(ents) != 2 {
		t.Fatal(ents, err)
	}
	if ents[1].ID != long {
		t.Fatalf("the cache closed last is not the most recently used: %+v", ents)
	}
	// Verifying a cache is not using it.
	if _, _, err := s.VerifyCache(short); err != nil {
		t.Fatal(err)
	}
	if again, _ := s.Caches(); again[1].ID != long || !again[0].LastUsed.Equal(ents[0].LastUsed) {
		t.Fatalf("cache verify changed when a cache was last used: %+v, was %+v", again, ents)
	}
	if _, err := s.GC(ents[1].Bytes); err != nil {
		t.Fatal(err)
	}
	if left, _ := s.Caches(); len(left) != 1 || left[0].ID != long {
		t.Fatalf("collection removed the cache used last: %+v", left)
	}
}

// At the default level, Badger's warnings and housekeeping never reach the
// log; its errors come as single-line warnings.
func TestBadgerQuietAtInfo(t *testing.T) {
	var buf bytes.Buffer
	l := badgerLog{zerolog.New(&buf).Level(zerolog.InfoLevel)}
	l.Warningf("Block cache might be too small. Metrics:\nhit: 1\nmiss: 2\n")
	l.Infof("Histogram of key sizes:\n  [0, 32) 5\n")
	l.Debugf("flushing")
	if buf.Len() != 0 {
		t.Fatalf("Badger's chatter reached the log: %s", buf.String())
	}
	l.Errorf("while deleting file: %s\nerr: %v\n", "x.mem", "boom")
	out := buf.String()
	if strings.Count(out, "\n") != 1 || !strings.Contains(out, `"level":"warn"`) || !strings.Contains(out, "x.mem | err: boom") {
		t.Fatalf("a Badger error is logged as %q, want one warning line", out)
	}
	// A whole store's life: open, import, cache, write, close.
	buf.Reset()
	dir := t.TempDir()
	s, err := Open(filepath.Join(dir, "st"), zerolog.New(&buf).Level(zerolog.InfoLevel))
	if err != nil {
		t.Fatal(err)
	}
	importTestBase(t, s, filepath.Join(dir, "base"), "b", 1)
	c, err := s.OpenCache(overlay.Digest{5}, 4096, [2]int64{1 << 20, 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	c.PutCow(overlay.ChunkID{Image: overlay.Disk}, make([]byte, 4096))
	c.Sync()
	c.Close()
	s.Close()
	if buf.Len() != 0 {
		t.Fatalf("the store logged at the default level: %s", buf.String())
	}
}
