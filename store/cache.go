package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dgraph-io/badger/v4"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// The chunk cache of an overlay is a pair of sparse files under the state
// dir, cache/<id>/disk and cache/<id>/memory, laid out like the images: a
// cached chunk sits at its own offset, so a run of cached chunks is one
// read. Badger records which segments are complete in them, and keeps the
// copy-on-write data. Keys, per overlay ID:
//
//	seg/<id><segment>         -> empty; the segment's chunks are in the files
//	cow/<id><image><index>    -> a whole chunk as written through the mount
//	cacheuse/<id>             -> when the cache was last opened, unix ns
//
// <id> is 32 raw bytes, <image> one byte, <index> and <segment> 4 bytes
// big-endian. A segment's marker is written only after its chunks are
// synced to the files, so a crash never leaves a marker over missing data.

// Cache holds what one overlay's mounts have fetched and written.
type Cache struct {
	db        *badger.DB
	id        overlay.Digest
	chunkSize int64
	files     [2]*os.File
}

// ChunkData is one chunk's bytes, to be cached at the chunk's offset.
type ChunkData struct {
	ID   overlay.ChunkID
	Data []byte
}

// OpenCache opens the cache of the overlay with the given ID, creating its
// files for images of the given sizes. Close it when done.
func (s *Store) OpenCache(id overlay.Digest, chunkSize int, sizes [2]int64) (*Cache, error) {
	dir := filepath.Join(s.dir, "cache", id.String())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	c := &Cache{db: s.db, id: id, chunkSize: int64(chunkSize)}
	fresh := false
	for _, img := range overlay.Images {
		p := filepath.Join(dir, img.String())
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			fresh = true
		}
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = f.Truncate(sizes[img])
		}
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("cache: %w", err)
		}
		c.files[img] = f
	}
	if err := s.touch(id); err != nil {
		c.Close()
		return nil, fmt.Errorf("cache: %w", err)
	}
	if fresh {
		// Files made anew hold nothing: forget any segment they held.
		if err := s.db.DropPrefix(append([]byte("seg/"), id[:]...)); err != nil {
			c.Close()
			return nil, fmt.Errorf("cache: %w", err)
		}
	}
	return c, nil
}

// Close closes the cache files.
func (c *Cache) Close() error {
	for _, f := range c.files {
		if f != nil {
			f.Close()
		}
	}
	return nil
}

func (c *Cache) key(prefix string, img overlay.Image, idx uint32) []byte {
	k := make([]byte, 0, len(prefix)+32+5)
	k = append(k, prefix...)
	k = append(k, c.id[:]...)
	k = append(k, byte(img))
	return binary.BigEndian.AppendUint32(k, idx)
}

func (c *Cache) segKey(seg int) []byte {
	k := append([]byte("seg/"), c.id[:]...)
	return binary.BigEndian.AppendUint32(k, uint32(seg))
}

// WriteSegment stores the chunks of one verified segment, syncs them, and
// only then marks the segment cached.
func (c *Cache) WriteSegment(seg int, chunks []ChunkData) error {
	var touched [2]bool
	for _, ch := range chunks {
		if _, err := c.files[ch.ID.Image].WriteAt(ch.Data, int64(ch.ID.Index)*c.chunkSize); err != nil {
			return err
		}
		touched[ch.ID.Image] = true
	}
	for img, t := range touched {
		if t {
			if err := unix.Fdatasync(int(c.files[img].Fd())); err != nil {
				return err
			}
		}
	}
	// The marker is not synced: if a crash loses it, the segment is fetched
	// again.
	return c.db.Update(func(txn *badger.Txn) error { return txn.Set(c.segKey(seg), nil) })
}

// Segments returns the segments whose chunks are all cached.
func (c *Cache) Segments() ([]int, error) {
	var out []int
	prefix := append([]byte("seg/"), c.id[:]...)
	err := c.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			out = append(out, int(binary.BigEndian.Uint32(k[len(prefix):])))
		}
		return nil
	})
	return out, err
}

// ReadAt reads cached bytes of an image.
func (c *Cache) ReadAt(img overlay.Image, p []byte, off int64) error {
	if _, err := c.files[img].ReadAt(p, off); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	return nil
}

// Cow copies a written chunk into dst and reports whether there was one.
func (c *Cache) Cow(id overlay.ChunkID, dst []byte) (bool, error) {
	found := false
	err := c.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(c.key("cow/", id.Image, id.Index))
		if err != nil {
			return err
		}
		found = true
		return it.Value(func(v []byte) error {
			if len(v) != len(dst) {
				return errors.New("written chunk has the wrong length")
			}
			copy(dst, v)
			return nil
		})
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	return found, err
}

// PutCow stores a whole chunk written through the mount. It is durable
// after the next Sync.
func (c *Cache) PutCow(id overlay.ChunkID, data []byte) error {
	return c.db.Update(func(txn *badger.Txn) error {
		return txn.Set(c.key("cow/", id.Image, id.Index), data)
	})
}

// DropWritten forgets every chunk written through mounts of this overlay.
func (c *Cache) DropWritten() error {
	if err := c.db.DropPrefix(append([]byte("cow/"), c.id[:]...)); err != nil {
		return err
	}
	return c.db.Sync()
}

// CowChunks lists the chunks that have been written.
func (c *Cache) CowChunks() ([]overlay.ChunkID, error) {
	var out []overlay.ChunkID
	prefix := append([]byte("cow/"), c.id[:]...)
	err := c.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()[len(prefix):]
			out = append(out, overlay.ChunkID{Image: overlay.Image(k[0]), Index: binary.BigEndian.Uint32(k[1:])})
		}
		return nil
	})
	return out, err
}

// Sync makes every write so far durable.
func (c *Cache) Sync() error { return c.db.Sync() }

// DropCaches forgets every cached chunk of every overlay; written data
// stays.
func (s *Store) DropCaches() error {
	if err := s.db.DropPrefix([]byte("seg/")); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(s.dir, "cache"))
}

// CacheEntry describes the cache of one overlay.
type CacheEntry struct {
	ID       overlay.Digest
	Bytes    int64 // disk space its files take
	LastUsed time.Time
}

func useKey(id overlay.Digest) []byte { return append([]byte("cacheuse/"), id[:]...) }

// touch records that an overlay's cache is in use now.
func (s *Store) touch(id overlay.Digest) error {
	return s.db.Update(func(txn *badger.Txn) error {
		return txn.Set(useKey(id), binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano())))
	})
}

// Caches lists the overlays with a cache, least recently used first.
func (s *Store) Caches() ([]CacheEntry, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "cache"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []CacheEntry
	for _, e := range ents {
		id, err := overlay.ParseDigest(e.Name())
		if err != nil {
			continue
		}
		ce := CacheEntry{ID: id}
		for _, img := range overlay.Images {
			var st unix.Stat_t
			if unix.Stat(filepath.Join(s.dir, "cache", e.Name(), img.String()), &st) == nil {
				ce.Bytes += st.Blocks * 512
			}
		}
		s.db.View(func(txn *badger.Txn) error {
			it, err := txn.Get(useKey(id))
			if err != nil {
				return err
			}
			return it.Value(func(v []byte) error {
				if len(v) == 8 {
					ce.LastUsed = time.Unix(0, int64(binary.BigEndian.Uint64(v)))
				}
				return nil
			})
		})
		out = append(out, ce)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.Before(out[j].LastUsed) })
	return out, nil
}

// RemoveCache drops an overlay's cached chunks. Data written through its
// mounts stays.
func (s *Store) RemoveCache(id overlay.Digest) error {
	if err := s.db.DropPrefix(append([]byte("seg/"), id[:]...)); err != nil {
		return err
	}
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(useKey(id)) }); err != nil {
		return err
	}
	if err := s.db.Sync(); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(s.dir, "cache", id.String()))
}

// GC removes the least recently used caches until all of them together
// take at most limit bytes. The caches in keep (those of mounted overlays)
// are never removed. It returns the bytes freed.
func (s *Store) GC(limit int64, keep ...overlay.Digest) (int64, error) {
	ents, err := s.Caches()
	if err != nil {
		return 0, err
	}
	var total int64
	for _, e := range ents {
		total += e.Bytes
	}
	var freed int64
	for _, e := range ents {
		if total <= limit {
			break
		}
		if slices.Contains(keep, e.ID) {
			continue
		}
		if err := s.RemoveCache(e.ID); err != nil {
			return freed, err
		}
		total -= e.Bytes
		freed += e.Bytes
	}
	return freed, nil
}
