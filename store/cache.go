package store

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dgraph-io/badger/v4"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// An overlay's chunk cache is a pair of sparse files under the state dir,
// cache/<id>/disk and cache/<id>/memory, laid out like the images: a cached
// chunk sits at its own offset, so a run of cached chunks is one read. Its
// own Badger database, overlays/<id>/db, records which segments are
// complete in the files and which chunks were written through the mount
// (their bytes are in files of their own, see written.go). Keys:
//
//	seg/<segment>         -> sha256 of the chunks' bytes, then the chunks
//	                         (uvarint index<<1|image each), in the order
//	                         hashed; the chunks are in the files
//	cow/<image><index>    -> one byte if the chunk was written through the
//	                         mount and is in the written-data file; empty
//	                         if it was discarded (fallocate punched or
//	                         zeroed all of it), so it reads as zeros
//
// <image> is one byte, <index> and <segment> 4 bytes big-endian. A
// segment's marker is written only after its chunks are synced to the
// files, and markers are dropped before the files are made anew, so a crash
// never leaves a marker over missing data. overlays/<id>/lock is held by
// the process that has the overlay open; its modification time is when the
// cache was last used (set when it is opened, written and closed), for
// eviction. State dirs of format 1 kept that in the registry (cacheuse/<id>,
// unix ns), which is still read.

// ErrInUse says another process has the overlay mounted.
var ErrInUse = errors.New("the overlay is mounted by another cloudletfs process")

// Cache holds what one overlay's mounts have fetched and written.
type Cache struct {
	db        *badger.DB
	dbDir     string
	logs      *logSync
	lock      *os.File
	id        overlay.Digest
	chunkSize int64
	files     [2]*os.File
	room      room
	mounted   bool // opened by OpenCache: Close records the use
	closeOnce sync.Once

	// The written-data files (see written.go); state is each chunk's
	// chunkNone, chunkDiscarded or chunkInFile as the markers say, and
	// pending the chunks written since the last commit that the markers
	// do not name yet. commitMu orders commits and discards, mu guards
	// state and pending.
	written  [2]*os.File
	sizes    [2]int64
	commitMu sync.Mutex
	mu       sync.Mutex
	state    [2][]uint8
	pending  map[overlay.ChunkID]struct{}
	// stop ends the committer, which closes stopped.
	stop, stopped chan struct{}
	// unsynced says a written-data file changed since it was last synced,
	// markersUnsynced that a marker of a written chunk did: an fsync
	// through the mount syncs only what changed, so a guest's fsync after
	// overwriting written chunks costs one fdatasync.
	unsynced        [2]atomic.Bool
	markersUnsynced atomic.Bool
	// syncMu makes an fsync wait for one under way: the markers the
	// first found unsynced are durable only once its sync of the logs
	// returns, and the second must not report them durable before that.
	syncMu sync.Mutex
	// punchFailed says a hole punch failed, which is logged once.
	punchFailed atomic.Bool
	// syncHook, set only by tests, runs before each sync of the logs, and
	// txnHook before each commit of a transaction of markers; an error
	// from it fails the commit.
	syncHook func()
	txnHook  func() error
}

// ChunkData is one chunk's bytes, to be cached at the chunk's offset.
type ChunkData struct {
	ID   overlay.ChunkID
	Data []byte
}

func (s *Store) cacheDir(id overlay.Digest) string {
	return filepath.Join(s.dir, "cache", id.String())
}

func (s *Store) overlayDir(id overlay.Digest) string {
	return filepath.Join(s.dir, "overlays", id.String())
}

// lockOverlay takes the lock of an overlay's cache and written data, or
// fails with ErrInUse.
func (s *Store) lockOverlay(id overlay.Digest) (*os.File, error) {
	dir := s.overlayDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := lockFile(filepath.Join(dir, "lock"), 0)
	if errors.Is(err, errLocked) {
		return nil, ErrInUse
	}
	return f, err
}

// OpenCache opens the cache of the overlay with the given ID, creating its
// files for images of the given sizes, and holds it until Close: another
// OpenCache of the same overlay, in any process, fails with ErrInUse.
func (s *Store) OpenCache(id overlay.Digest, chunkSize int, sizes [2]int64) (_ *Cache, err error) {
	c := &Cache{id: id, chunkSize: int64(chunkSize), dbDir: filepath.Join(s.overlayDir(id), "db"),
		room: room{dir: s.dir, log: s.log.With().Str("overlay", id.String()).Logger()}}
	defer func() {
		if err != nil {
			c.Close()
			err = fmt.Errorf("cache of overlay %s: %w", id, err)
		}
	}()
	if c.lock, err = s.lockOverlay(id); err != nil {
		return nil, err
	}
	c.room.probe = c.lock
	// Opening Badger writes to its mapped logs.
	if err := c.room.check(); err != nil {
		return nil, err
	}
	// Written chunks are 4 KiB values; small memtables keep a mount's
	// memory small.
	if c.db, err = openDB(c.dbDir, s.log, 8<<20); err != nil {
		return nil, err
	}
	c.logs = &logSync{db: c.db, dir: c.dbDir}
	dir := s.cacheDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for _, img := range overlay.Images {
		if _, err := os.Stat(filepath.Join(dir, img.String())); errors.Is(err, os.ErrNotExist) {
			// Files made anew hold nothing: forget, durably, any segment
			// they held before creating them.
			if err := c.db.DropPrefix([]byte("seg/")); err != nil {
				return nil, err
			}
			if err := c.sync(); err != nil {
				return nil, err
			}
			break
		}
	}
	for _, img := range overlay.Images {
		f, err := os.OpenFile(filepath.Join(dir, img.String()), os.O_RDWR|os.O_CREATE, 0o600)
		if err == nil {
			err = f.Truncate(sizes[img])
		}
		if err != nil {
			if f != nil {
				f.Close()
			}
			return nil, err
		}
		c.files[img] = f
	}
	if err := c.db.Update(func(txn *badger.Txn) error {
		return txn.Set([]byte("chunksize"), binary.BigEndian.AppendUint32(nil, uint32(chunkSize)))
	}); err != nil {
		return nil, err
	}
	if err := c.openWritten(s.writtenDir(id), sizes); err != nil {
		return nil, err
	}
	if err := s.moveOldKeys(c); err != nil {
		return nil, err
	}
	if err := c.touch(); err != nil {
		return nil, err
	}
	c.mounted = true
	return c, nil
}

// moveOldKeys moves data written through mounts of the overlay that state
// dirs of format 1 kept in the registry (cow/<id><image><index>) into the
// overlay's own database, and drops the registry's segment markers of it
// (seg/<id><segment>), which carry no digest: those segments are fetched
// again.
func (s *Store) moveOldKeys(c *Cache) error {
	moved := 0
	for _, prefix := range []string{"cow/", "seg/"} {
		old := append([]byte(prefix), c.id[:]...)
		found := false
		err := s.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: old, PrefetchValues: prefix == "cow/"})
			defer it.Close()
			for it.Rewind(); it.Valid(); it.Next() {
				k := it.Item().Key()
				found = true
				if prefix != "cow/" || len(k) != len(old)+5 {
					continue
				}
				v, err := it.Item().ValueCopy(nil)
				if err != nil {
					return err
				}
				if err := c.PutCow(overlay.ChunkID{Image: overlay.Image(k[len(old)]), Index: binary.BigEndian.Uint32(k[len(old)+1:])}, v); err != nil {
					return err
				}
				moved++
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("moving written data out of the registry: %w", err)
		}
		if !found {
			continue
		}
		// Durable in the overlay's own files before the registry forgets it.
		if err := c.Sync(); err != nil {
			return err
		}
		if err := s.db.DropPrefix(old); err != nil {
			return err
		}
		if err := s.sync(); err != nil {
			return err
		}
	}
	if moved > 0 {
		s.log.Info().Int("chunks", moved).Str("overlay", c.id.String()).Msg("moved written data into the overlay's own database")
	}
	return nil
}

// VerifyCache runs Cache.Verify on the cache of an overlay that is not
// mounted (ErrInUse otherwise). It holds only that overlay's lock, not the
// registry, so it may run after Close.
func (s *Store) VerifyCache(id overlay.Digest) (checked int, bad []int, err error) {
	// Checking is not using: the probes of the state dir write to the
	// lock, whose modification time says when the cache was last used.
	lockPath := filepath.Join(s.overlayDir(id), "lock")
	if st, err := os.Stat(lockPath); err == nil {
		defer os.Chtimes(lockPath, st.ModTime(), st.ModTime())
	}
	c := &Cache{id: id, dbDir: filepath.Join(s.overlayDir(id), "db"), room: room{dir: s.dir, log: s.log}}
	defer c.Close()
	if c.lock, err = s.lockOverlay(id); err != nil {
		return 0, nil, err
	}
	c.room.probe = c.lock
	if err := c.room.check(); err != nil {
		return 0, nil, err
	}
	if c.db, err = openDB(c.dbDir, s.log, 8<<20); err != nil {
		return 0, nil, err
	}
	c.logs = &logSync{db: c.db, dir: c.dbDir}
	err = c.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get([]byte("chunksize"))
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error {
			if len(v) != 4 || binary.BigEndian.Uint32(v) == 0 {
				return errors.New("bad chunk size record")
			}
			c.chunkSize = int64(binary.BigEndian.Uint32(v))
			return nil
		})
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, nil, nil // never opened: nothing cached
	}
	if err != nil {
		return 0, nil, err
	}
	for _, img := range overlay.Images {
		if c.files[img], err = os.OpenFile(filepath.Join(s.cacheDir(id), img.String()), os.O_RDWR, 0); errors.Is(err, os.ErrNotExist) {
			return 0, nil, nil // removed: the next open drops the markers
		} else if err != nil {
			return 0, nil, err
		}
	}
	return c.Verify()
}

// Close closes the cache, records that it was used until now, and lets
// other processes open it. Closing twice is harmless.
func (c *Cache) Close() error {
	var err error
	c.closeOnce.Do(func() {
		// The probe writes to the lock, which sets its mtime to the
		// kernel's coarse clock: it goes first, so that touch has the
		// last word.
		var perr error
		if c.db != nil {
			perr = c.room.probeWrite()
		}
		if c.mounted {
			// Before the lock goes: a collection that runs once it is
			// free must see this cache as the most recently used.
			c.touch()
		}
		if c.stop != nil {
			close(c.stop)
			<-c.stopped
		}
		var cerr error
		if c.db != nil && c.pending != nil && perr == nil {
			// What was written goes in before the database closes: a
			// clean unmount keeps it all.
			cerr = c.commit()
		}
		for _, f := range append(c.files[:], c.written[:]...) {
			if f != nil {
				f.Close()
			}
		}
		if c.db != nil {
			if errors.Is(perr, syscall.EROFS) {
				// Badger's Close flushes the memtable, and retries a
				// failed flush forever. What the logs hold is replayed at
				// the next open.
				err = fmt.Errorf("cache of overlay %s is left as it is: %w", c.id, perr)
			} else {
				err = errors.Join(cerr, c.db.Close())
			}
		}
		if c.lock != nil {
			c.lock.Close()
		}
	})
	return err
}

func cowKey(img overlay.Image, idx uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{'c', 'o', 'w', '/', byte(img)}, idx)
}

func segKey(seg int) []byte {
	return binary.BigEndian.AppendUint32([]byte("seg/"), uint32(seg))
}

// WriteSegment stores the chunks of one verified segment, syncs them, and
// only then marks the segment cached. The marker carries a digest of the
// chunks, so Verify can tell that the files still hold them.
//
// It fails with an error that wraps syscall.ENOSPC or syscall.EROFS when
// the state dir is full or read-only; nothing is marked then.
func (c *Cache) WriteSegment(seg int, chunks []ChunkData) error {
	if err := c.room.check(); err != nil {
		return fmt.Errorf("caching segment %d: %w", seg, err)
	}
	var touched [2]bool
	h := sha256.New()
	marker := make([]byte, sha256.Size, sha256.Size+3*len(chunks))
	for _, ch := range chunks {
		if _, err := c.files[ch.ID.Image].WriteAt(ch.Data, int64(ch.ID.Index)*c.chunkSize); err != nil {
			return fmt.Errorf("caching segment %d: %w", seg, err)
		}
		touched[ch.ID.Image] = true
		h.Write(ch.Data)
		marker = binary.AppendUvarint(marker, uint64(ch.ID.Index)<<1|uint64(ch.ID.Image))
	}
	h.Sum(marker[:0])
	for img, t := range touched {
		if t {
			if err := unix.Fdatasync(int(c.files[img].Fd())); err != nil {
				return fmt.Errorf("caching segment %d: syncing %s: %w", seg, c.files[img].Name(), err)
			}
		}
	}
	// The marker is not synced: if a crash loses it, the segment is fetched
	// again.
	if err := c.db.Update(func(txn *badger.Txn) error { return txn.Set(segKey(seg), marker) }); err != nil {
		return fmt.Errorf("caching segment %d: %w", seg, err)
	}
	return nil
}

// Verify re-reads the chunks of every cached segment and checks them
// against the digest recorded when they were cached. Segments that fail
// are forgotten, so a mount fetches them again. It returns how many
// segments were checked and which failed.
func (c *Cache) Verify() (checked int, bad []int, err error) {
	type marker struct {
		seg int
		val []byte
	}
	var markers []marker
	err = c.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("seg/"), PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			markers = append(markers, marker{int(binary.BigEndian.Uint32(it.Item().Key()[4:])), v})
		}
		return nil
	})
	if err != nil {
		return 0, nil, err
	}
	var sizes [2]int64
	for img, f := range c.files {
		st, err := f.Stat()
		if err != nil {
			return 0, nil, err
		}
		sizes[img] = st.Size()
	}
	buf := make([]byte, c.chunkSize)
	for _, m := range markers {
		ok, err := c.checkMarker(m.val, sizes, buf)
		if err != nil {
			return checked, bad, err
		}
		checked++
		if !ok {
			bad = append(bad, m.seg)
		}
	}
	if len(bad) > 0 {
		err = c.db.Update(func(txn *badger.Txn) error {
			for _, seg := range bad {
				if err := txn.Delete(segKey(seg)); err != nil {
					return err
				}
			}
			return nil
		})
		if err == nil {
			err = c.sync()
		}
	}
	return checked, bad, err
}

// checkMarker hashes the chunks a segment marker names, as the files hold
// them now, and compares the digest.
func (c *Cache) checkMarker(v []byte, sizes [2]int64, buf []byte) (bool, error) {
	if len(v) < sha256.Size {
		return false, nil
	}
	h := sha256.New()
	for rest := v[sha256.Size:]; len(rest) > 0; {
		x, n := binary.Uvarint(rest)
		if n <= 0 || x>>1 > math.MaxUint32 {
			return false, nil
		}
		rest = rest[n:]
		img, idx := overlay.Image(x&1), int64(x>>1)
		n2 := min(c.chunkSize, sizes[img]-idx*c.chunkSize)
		if n2 <= 0 {
			return false, nil
		}
		if _, err := c.files[img].ReadAt(buf[:n2], idx*c.chunkSize); err != nil {
			// Unreadable is as bad as different: fetch the segment again.
			return false, nil
		}
		h.Write(buf[:n2])
	}
	return bytes.Equal(h.Sum(nil), v[:sha256.Size]), nil
}

// Segments returns the segments whose chunks are all cached.
func (c *Cache) Segments() ([]int, error) {
	var out []int
	prefix := []byte("seg/")
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

// Sync makes every write so far durable: the written-data files, then the
// markers of the chunks newly written to them, then the database's logs.
func (c *Cache) Sync() error {
	c.syncMu.Lock()
	defer c.syncMu.Unlock()
	if err := c.commit(); err != nil {
		return err
	}
	if !c.markersUnsynced.Swap(false) {
		return nil
	}
	if err := c.sync(); err != nil {
		c.markersUnsynced.Store(true)
		return err
	}
	return nil
}

func (c *Cache) sync() error {
	if c.syncHook != nil {
		c.syncHook()
	}
	return c.logs.sync()
}

// DropCaches forgets every cached chunk of every overlay that is not
// mounted; written data stays.
func (s *Store) DropCaches() error {
	ents, err := s.Caches()
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := s.RemoveCache(e.ID); err != nil && !errors.Is(err, ErrInUse) {
			return err
		}
	}
	return nil
}

// CacheEntry describes the cache of one overlay.
type CacheEntry struct {
	ID       overlay.Digest
	Bytes    int64 // disk space its files take
	LastUsed time.Time
	Mounted  bool // a process has it open
}

func useKey(id overlay.Digest) []byte { return append([]byte("cacheuse/"), id[:]...) }

// touch records that the cache is in use now: the modification time of
// its lock, which the cache holds and nobody else writes.
func (c *Cache) touch() error {
	now := time.Now()
	return os.Chtimes(c.lock.Name(), now, now)
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
			if unix.Stat(filepath.Join(s.cacheDir(id), img.String()), &st) == nil {
				ce.Bytes += st.Blocks * 512
			}
		}
		// Read before the lock is taken, which may create it.
		if st, err := os.Stat(filepath.Join(s.overlayDir(id), "lock")); err == nil {
			ce.LastUsed = st.ModTime()
		}
		if l, err := s.lockOverlay(id); errors.Is(err, ErrInUse) {
			ce.Mounted = true
		} else if err == nil {
			l.Close()
		}
		s.db.View(func(txn *badger.Txn) error {
			it, err := txn.Get(useKey(id))
			if err != nil {
				return err
			}
			return it.Value(func(v []byte) error {
				if len(v) != 8 {
					return nil
				}
				if old := time.Unix(0, int64(binary.BigEndian.Uint64(v))); old.After(ce.LastUsed) {
					ce.LastUsed = old
				}
				return nil
			})
		})
		out = append(out, ce)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.Before(out[j].LastUsed) })
	return out, nil
}

// RemoveCache drops an overlay's cached chunks; it fails with ErrInUse
// while the overlay is mounted. Data written through its mounts stays.
func (s *Store) RemoveCache(id overlay.Digest) error {
	lock, err := s.lockOverlay(id)
	if err != nil {
		return err
	}
	defer lock.Close()
	// The segment markers go with the files: the next OpenCache finds no
	// files and drops them before it makes new ones.
	if err := os.RemoveAll(s.cacheDir(id)); err != nil {
		return err
	}
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Delete(useKey(id)) }); err != nil {
		return err
	}
	return s.sync()
}

// GC removes the least recently used caches until all of them together
// take at most limit bytes. Caches of mounted overlays, and those in keep,
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
		if e.Mounted || slices.Contains(keep, e.ID) {
			continue
		}
		if err := s.RemoveCache(e.ID); errors.Is(err, ErrInUse) {
			continue // mounted since it was listed
		} else if err != nil {
			return freed, err
		}
		total -= e.Bytes
		freed += e.Bytes
	}
	return freed, nil
}

// VerifySegment re-reads one cached segment's chunks and checks them
// against the digest recorded when they were cached. A segment that fails
// is forgotten, so it is fetched again. A segment not cached reports false.
func (c *Cache) VerifySegment(seg int) (bool, error) {
	var v []byte
	err := c.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(segKey(seg))
		if err != nil {
			return err
		}
		v, err = it.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var sizes [2]int64
	for img, f := range c.files {
		st, err := f.Stat()
		if err != nil {
			return false, err
		}
		sizes[img] = st.Size()
	}
	ok, err := c.checkMarker(v, sizes, make([]byte, c.chunkSize))
	if err != nil || ok {
		return ok, err
	}
	return false, c.db.Update(func(txn *badger.Txn) error { return txn.Delete(segKey(seg)) })
}
