package store

import (
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// benchCache opens a cache in a fresh state dir under the test's temporary
// directory, on the disk that holds it.
func benchCache(b *testing.B) *Cache {
	s, err := Open(filepath.Join(b.TempDir(), "st"), zerolog.Nop())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	c, err := s.OpenCache(overlay.Digest{7}, 4096, [2]int64{4 << 30, 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkPutCow is one 4 KiB chunk written through the mount, without
// an fsync.
func BenchmarkPutCow(b *testing.B) {
	c := benchCache(b)
	data := make([]byte, 4096)
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		data[0] = byte(i)
		if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: uint32(i % (1 << 20))}, data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteFsync is one 128 KiB write through the mount (32 chunks of
// 4 KiB) followed by an fsync.
func BenchmarkWriteFsync(b *testing.B) {
	c := benchCache(b)
	data := make([]byte, 4096)
	b.SetBytes(32 * 4096)
	for i := 0; b.Loop(); i++ {
		for j := range 32 {
			data[0] = byte(j)
			if err := c.PutCow(overlay.ChunkID{Image: overlay.Disk, Index: uint32((i*32 + j) % (1 << 20))}, data); err != nil {
				b.Fatal(err)
			}
		}
		if err := c.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}
