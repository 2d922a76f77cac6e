package store

import (
	"encoding/binary"
	"errors"

	"github.com/dgraph-io/badger/v4"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Key layout of the chunk cache and copy-on-write data, per overlay ID:
//
//	chunk/<id><image><index>  -> decoded chunk bytes, from a verified segment
//	seg/<id><segment>         -> empty; every chunk of the segment is cached
//	cow/<id><image><index>    -> a whole chunk as written through the mount
//
// <id> is 32 raw bytes, <image> one byte, <index> and <segment> 4 bytes
// big-endian.

// Cache holds what one overlay's mounts have fetched and written.
type Cache struct {
	db *badger.DB
	id overlay.Digest
}

// Cache returns the cache of the overlay with the given ID.
func (s *Store) Cache(id overlay.Digest) *Cache { return &Cache{db: s.db, id: id} }

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

// PutSegment stores the chunks of one verified segment and marks it cached,
// all in one batch: a segment is either wholly cached or not at all.
func (c *Cache) PutSegment(seg int, ids []overlay.ChunkID, data [][]byte) error {
	wb := c.db.NewWriteBatch()
	defer wb.Cancel()
	for i, id := range ids {
		if err := wb.Set(c.key("chunk/", id.Image, id.Index), data[i]); err != nil {
			return err
		}
	}
	if err := wb.Set(c.segKey(seg), nil); err != nil {
		return err
	}
	return wb.Flush()
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

// Chunk copies a cached chunk into dst and reports whether it was there.
func (c *Cache) Chunk(id overlay.ChunkID, dst []byte) (bool, error) {
	return c.get(c.key("chunk/", id.Image, id.Index), dst)
}

// Cow copies a written chunk into dst and reports whether there was one.
func (c *Cache) Cow(id overlay.ChunkID, dst []byte) (bool, error) {
	return c.get(c.key("cow/", id.Image, id.Index), dst)
}

func (c *Cache) get(key, dst []byte) (bool, error) {
	found := false
	err := c.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(key)
		if err != nil {
			return err
		}
		found = true
		return it.Value(func(v []byte) error {
			if len(v) != len(dst) {
				return errors.New("cached chunk has the wrong length")
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
// when PutCow returns.
func (c *Cache) PutCow(id overlay.ChunkID, data []byte) error {
	return c.db.Update(func(txn *badger.Txn) error {
		return txn.Set(c.key("cow/", id.Image, id.Index), data)
	})
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
