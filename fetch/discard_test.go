package fetch_test

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// partCache is the real cache with discards failing part way, as they do
// when the second of several transactions of markers fails: a seam for a
// failure the test cannot make Badger produce.
type partCache struct {
	*store.Cache
	done int
}

func (c *partCache) DiscardCows(ids []overlay.ChunkID) error {
	if err := c.Cache.DiscardCows(ids[:c.done]); err != nil {
		return err
	}
	return &store.DiscardError{Done: c.done, Err: syscall.EIO}
}

// A discard the store did only part of fails, and the chunks it did
// discard read as zeros through the fetcher, as they do from the store
// and will after a remount; the others are as they were.
func TestDiscardFailsPartWay(t *testing.T) {
	r := newRig(t)
	f, err := fetch.New(r.src, r.o, r.base, &partCache{Cache: r.cache, done: 2}, fetch.Options{Timeout: 5 * time.Second, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	var ids []overlay.ChunkID
	for i := range len(r.o.Manifest.Refs[overlay.Disk]) {
		if id := (overlay.ChunkID{Image: overlay.Disk, Index: uint32(i)}); !f.AllZero(id) && len(ids) < 4 {
			ids = append(ids, id)
		}
	}
	if len(ids) < 4 {
		t.Fatalf("the overlay has %d disk chunks that are not zero, want 4", len(ids))
	}
	if err := f.DiscardChunks(ids); !errors.Is(err, syscall.EIO) {
		t.Fatalf("a discard failing part way: %v, want EIO", err)
	}
	for i, id := range ids {
		if f.AllZero(id) != (i < 2) {
			t.Fatalf("chunk %v reads as zeros: %v, want %v", id, f.AllZero(id), i < 2)
		}
	}
	if got := f.Stats().ChunksDiscarded; got != 2 {
		t.Fatalf("%d chunks discarded in the stats, want 2", got)
	}
}
