package store

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
	if _, err := Open(filepath.Join(dir, "st"), zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "in use") {
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
