package fetch_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// Segments staged by a handoff are read from their files, not the
// source; one whose file is corrupt fails verification once and then
// comes from the source, and every byte read is the overlay's.
func TestStagedSegments(t *testing.T) {
	r := newRig(t)
	if len(r.o.Manifest.Segments) < 3 {
		t.Fatalf("the rig has %d segments, want 3 or more", len(r.o.Manifest.Segments))
	}
	dir := t.TempDir()
	file, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	stored := func(i int) []byte {
		s := r.o.Manifest.Segments[i]
		return file[s.Offset : s.Offset+int64(s.Stored)]
	}
	s0, s1 := r.o.Manifest.Segments[0], r.o.Manifest.Segments[1]
	os.WriteFile(filepath.Join(dir, s0.SHA.String()), stored(0), 0o600)
	bad := append([]byte(nil), stored(1)...)
	bad[len(bad)/2] ^= 0xff
	os.WriteFile(filepath.Join(dir, s1.SHA.String()), bad, 0o600)

	var fromSource [64]atomic.Int32
	r.src.hook = func(ctx context.Context, off int64, b []byte) ([]byte, error) {
		for i, s := range r.o.Manifest.Segments {
			if s.Offset == off {
				fromSource[i].Add(1)
			}
		}
		return b, nil
	}
	f, err := fetch.New(fetch.Staged(r.src, r.o, dir), r.o, r.base, r.cache, fetch.Options{Timeout: 10 * time.Second, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	f.Start()
	awaitComplete(t, f, 30*time.Second, "the staged overlay")
	for _, img := range overlay.Images {
		want := r.image(t, img)
		got := make([]byte, len(want))
		if err := f.ReadAt(context.Background(), img, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s read through the staged source differs (%v)", img, err)
		}
	}
	if n := fromSource[0].Load(); n != 0 {
		t.Fatalf("the staged segment 0 was fetched from the source %d times", n)
	}
	if n := fromSource[1].Load(); n != 1 {
		t.Fatalf("the corrupt staged segment 1 was fetched from the source %d times, want once", n)
	}
	if n := fromSource[2].Load(); n != 1 {
		t.Fatalf("segment 2, not staged, was fetched %d times, want once", n)
	}
}
