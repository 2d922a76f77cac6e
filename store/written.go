package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/dgraph-io/badger/v4"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Data written through a mount lives in two sparse files per overlay,
// overlays/<id>/written/disk and .../memory, laid out like the images: a
// written chunk sits at its own offset, so a run of written chunks is one
// pread or pwrite, and reading one costs no database lookup. The database
// says which chunks the files hold: cow/<image><index> is one byte
// (writtenMark) for a chunk in the file, and empty for a discarded one.
// (Format 2 state dirs kept the whole chunk as the value: OpenCache moves
// such chunks into the files.)
//
// Crash safety: a chunk that was never written before reads, after a
// crash, either as before (its marker was lost) or as its new bytes, never
// as a hole. So its marker goes to the database only after its bytes are
// synced to the file: markers of newly written chunks wait in pending
// until the next commit, which syncs the files and then writes them (Sync,
// Close, or every pendingLimit chunks). A chunk already in the file is
// overwritten in place, as a write to an image file on a local disk is.
// A file found missing at open is made anew only after the markers of the
// chunks it held are dropped, durably, and logged as lost: its holes are
// never served as written data.

// writtenMark is the value of the marker of a chunk held in the files.
var writtenMark = []byte{1}

// pendingLimit is how many newly written chunks wait for a commit at most,
// and commitEvery how long: they bound what a crash without an fsync can
// lose (a plain file loses nothing when its writer is killed, and what the
// kernel had not written back in a power cut), and the memory pending
// takes.
const (
	pendingLimit = 4096
	commitEvery  = time.Second
)

// Chunk states kept in memory, per chunk.
const (
	chunkNone      = iota // not written
	chunkDiscarded        // discarded: empty marker
	chunkInFile           // written: marker committed, bytes in the file
)

func (s *Store) writtenDir(id overlay.Digest) string {
	return filepath.Join(s.overlayDir(id), "written")
}

// openWritten opens the written-data files for images of the given sizes
// and loads the markers, moving chunks that older state dirs kept in the
// database into the files.
func (c *Cache) openWritten(dir string, sizes [2]int64) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var made []overlay.Image
	var isMade [2]bool
	for _, img := range overlay.Images {
		if _, err := os.Stat(filepath.Join(dir, img.String())); errors.Is(err, os.ErrNotExist) {
			made = append(made, img)
			isMade[img] = true
		} else if err != nil {
			return err
		}
		c.sizes[img] = sizes[img]
	}
	if len(made) > 0 {
		if err := c.dropLostMarkers(made); err != nil {
			return fmt.Errorf("dropping the markers of written chunks whose file is gone: %w", err)
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
			return err
		}
		c.written[img] = f
		c.state[img] = make([]uint8, (sizes[img]+c.chunkSize-1)/c.chunkSize)
	}
	if len(made) > 0 {
		// The new files' names, and the directory's, are durable before
		// any marker names a chunk in them.
		for _, d := range []string{dir, filepath.Dir(dir)} {
			if err := fsyncPath(d, false); err != nil {
				return fmt.Errorf("syncing %s: %w", d, err)
			}
		}
	}
	c.pending = map[overlay.ChunkID]struct{}{}
	c.stop, c.stopped = make(chan struct{}), make(chan struct{})
	go c.committer()
	var old []overlay.ChunkID
	prefix := []byte("cow/")
	err := c.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()[len(prefix):]
			id := overlay.ChunkID{Image: overlay.Image(k[0]), Index: binary.BigEndian.Uint32(k[1:])}
			if int(id.Image) >= len(c.state) || int64(id.Index) >= int64(len(c.state[id.Image])) {
				continue
			}
			switch n := it.Item().ValueSize(); {
			case n == 0:
				c.state[id.Image][id.Index] = chunkDiscarded
			case !c.oldChunk(id, n, isMade[id.Image]):
				c.state[id.Image][id.Index] = chunkInFile
			default:
				v, err := it.Item().ValueCopy(nil)
				if err != nil {
					return err
				}
				if _, err := c.written[id.Image].WriteAt(v, int64(id.Index)*c.chunkSize); err != nil {
					return err
				}
				c.unsynced[id.Image].Store(true)
				old = append(old, id)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("loading written chunks: %w", err)
	}
	if len(old) == 0 {
		return nil
	}
	// The moved bytes are synced before their markers replace them.
	if err := c.syncWritten(); err != nil {
		return err
	}
	if _, err := c.setMarkers(old, writtenMark); err != nil {
		return err
	}
	for _, id := range old {
		c.state[id.Image][id.Index] = chunkInFile
	}
	c.room.log.Info().Int("chunks", len(old)).Msg("moved written data out of the database into the written-data files")
	return c.sync()
}

// oldChunk tells a chunk that older state dirs kept whole in the database
// from a marker (writtenMark), by the value's size n: an old chunk is as
// long as the chunk, which only the last chunk of an image can be by
// being one byte long. Such a one-byte value is a marker if the
// written-data file was there (made is false): old chunks are moved into
// it, synced, before their markers replace them; and an old chunk if the
// file is being made, as it is the first time a state dir of that format
// is opened.
func (c *Cache) oldChunk(id overlay.ChunkID, n int64, made bool) bool {
	length := min(c.chunkSize, c.sizes[id.Image]-int64(id.Index)*c.chunkSize)
	if n != int64(len(writtenMark)) {
		return true
	}
	return length == n && made
}

// dropLostMarkers drops, durably, the markers of chunks held in the
// written-data files of imgs, which are missing and about to be made
// anew: the bytes those markers name are gone, and a new file would serve
// its holes as the chunks. Discard markers (empty) and chunks older state
// dirs kept in the database need no file and stay.
func (c *Cache) dropLostMarkers(imgs []overlay.Image) error {
	var lost [2]int
	wb := c.db.NewWriteBatch()
	defer wb.Cancel()
	err := c.db.View(func(txn *badger.Txn) error {
		for _, img := range imgs {
			prefix := []byte{'c', 'o', 'w', '/', byte(img)}
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
			for it.Rewind(); it.Valid(); it.Next() {
				k := it.Item().Key()[len(prefix):]
				id := overlay.ChunkID{Image: img, Index: binary.BigEndian.Uint32(k)}
				if n := it.Item().ValueSize(); n == 0 || c.oldChunk(id, n, true) {
					continue
				}
				if err := wb.Delete(it.Item().KeyCopy(nil)); err != nil {
					it.Close()
					return err
				}
				lost[img]++
			}
			it.Close()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if lost[0]+lost[1] == 0 {
		return nil
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	if err := c.sync(); err != nil {
		return err
	}
	for _, img := range imgs {
		if lost[img] > 0 {
			c.room.log.Error().Str("image", img.String()).Int("chunks", lost[img]).
				Msg("the written-data file of the image is gone (removed by hand?): the data written to those chunks through earlier mounts is lost; they read as the overlay has them")
		}
	}
	return nil
}

// WriteCow stores bytes written through the mount at off in image img. Each
// chunk it touches must be covered whole by p or already be written (see
// Written): a chunk is never part new bytes and part hole. It is durable
// after the next Sync. It fails with an error that wraps syscall.EROFS
// when the state dir is read-only, and one that wraps syscall.ENOSPC when
// it is full (below SpaceReserve) and p touches a chunk not written yet.
func (c *Cache) WriteCow(img overlay.Image, p []byte, off int64) error {
	first, last := off/c.chunkSize, (off+int64(len(p))-1)/c.chunkSize
	fail := func(err error) error {
		return fmt.Errorf("storing written %s chunks %d-%d: %w", img, first, last, err)
	}
	if len(p) == 0 {
		return nil
	}
	// Chunks already in the file are overwritten in place, which takes no
	// new space: below the reserve they still take writes, as an image
	// file on a full local disk does. New chunks take space, and a marker
	// each.
	c.mu.Lock()
	inPlace := true
	for i := first; i <= last && inPlace; i++ {
		_, pending := c.pending[overlay.ChunkID{Image: img, Index: uint32(i)}]
		inPlace = pending || i < int64(len(c.state[img])) && c.state[img][i] == chunkInFile
	}
	c.mu.Unlock()
	check := c.room.check
	if inPlace {
		check = c.room.checkWritable
	}
	if err := check(); err != nil {
		return fail(err)
	}
	if _, err := c.written[img].WriteAt(p, off); err != nil {
		return fail(err)
	}
	c.unsynced[img].Store(true)
	c.mu.Lock()
	for i := first; i <= last; i++ {
		if c.state[img][i] != chunkInFile {
			c.pending[overlay.ChunkID{Image: img, Index: uint32(i)}] = struct{}{}
		}
	}
	full := len(c.pending) >= pendingLimit
	c.mu.Unlock()
	if full {
		if err := c.commit(); err != nil {
			return fail(err)
		}
	}
	return nil
}

// ReadCow reads written bytes of an image; every chunk it touches must be
// written, by WriteCow.
func (c *Cache) ReadCow(img overlay.Image, p []byte, off int64) error {
	if _, err := c.written[img].ReadAt(p, off); err != nil {
		return fmt.Errorf("written data of %s at %d: %w", img, off, err)
	}
	return nil
}

// Cow copies a written chunk into dst and reports whether there was one; a
// discarded chunk reads as zeros.
func (c *Cache) Cow(id overlay.ChunkID, dst []byte) (bool, error) {
	c.mu.Lock()
	_, pending := c.pending[id]
	st := c.state[id.Image][id.Index]
	c.mu.Unlock()
	switch {
	case pending || st == chunkInFile:
		return true, c.ReadCow(id.Image, dst, int64(id.Index)*c.chunkSize)
	case st == chunkDiscarded:
		clear(dst)
		return true, nil
	}
	return false, nil
}

// PutCow stores a whole chunk written through the mount, as WriteCow does.
func (c *Cache) PutCow(id overlay.ChunkID, data []byte) error {
	return c.WriteCow(id.Image, data, int64(id.Index)*c.chunkSize)
}

// commit syncs the written-data files and then records the chunks written
// since the last commit as held in them. Discards commit too, under the
// same lock, so a discard's marker is never overwritten by an older write's.
func (c *Cache) commit() error {
	c.commitMu.Lock()
	defer c.commitMu.Unlock()
	c.mu.Lock()
	ids := make([]overlay.ChunkID, 0, len(c.pending))
	for id := range c.pending {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	if err := c.syncWritten(); err != nil {
		return err
	}
	if len(ids) == 0 {
		return nil
	}
	// Only markers go in, a byte each for chunks whose bytes were taken
	// while there was room: the reserve is there so that such writes
	// still can, and refusing them below it would lose writes the guest
	// was told succeeded.
	if err := c.room.checkWritable(); err != nil {
		return err
	}
	done, err := c.setMarkers(ids, writtenMark)
	c.mu.Lock()
	for _, id := range ids[:done] {
		delete(c.pending, id)
		c.state[id.Image][id.Index] = chunkInFile
	}
	c.mu.Unlock()
	return err
}

// committer commits what was written every commitEvery, until stop.
func (c *Cache) committer() {
	defer close(c.stopped)
	t := time.NewTicker(commitEvery)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.mu.Lock()
		n := len(c.pending)
		c.mu.Unlock()
		if n == 0 {
			continue
		}
		// A failure is met again, and returned, by the next write, fsync
		// or close.
		if err := c.commit(); err != nil {
			c.room.log.Debug().Err(err).Msg("committing written chunks")
		}
	}
}

// syncWritten syncs the bytes of the written-data files that changed since
// they were last synced.
func (c *Cache) syncWritten() error {
	for img, f := range c.written {
		if f == nil || !c.unsynced[img].Swap(false) {
			continue
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			c.unsynced[img].Store(true)
			return fmt.Errorf("syncing %s: %w", f.Name(), err)
		}
	}
	return nil
}

// setMarkers sets the markers of chunks to v, in one transaction, or in as
// few as Badger's limit on a transaction's size allows. It returns how
// many of ids, from the first, have their markers in: on a failure part
// way, those are set and the rest are not.
func (c *Cache) setMarkers(ids []overlay.ChunkID, v []byte) (int, error) {
	// Raised once the markers are in, while commitMu is held: a Sync,
	// whose commit waits for commitMu, finds it raised if a marker went
	// in before and syncs the logs. Raised before, a Sync could lower it
	// and sync before the markers are in.
	defer c.markersUnsynced.Store(true)
	txn := c.db.NewTransaction(true)
	defer func() { txn.Discard() }()
	commit := func() error {
		if c.txnHook != nil {
			if err := c.txnHook(); err != nil {
				return err
			}
		}
		return txn.Commit()
	}
	done := 0
	for i, id := range ids {
		err := txn.Set(cowKey(id.Image, id.Index), v)
		if errors.Is(err, badger.ErrTxnTooBig) {
			if err = commit(); err != nil {
				return done, err
			}
			done = i
			txn = c.db.NewTransaction(true)
			err = txn.Set(cowKey(id.Image, id.Index), v)
		}
		if err != nil {
			return done, err
		}
	}
	if err := commit(); err != nil {
		return done, err
	}
	return len(ids), nil
}

// DiscardError says a discard failed part way, when its markers took more
// than one transaction: the first Done chunks are discarded (they read as
// zeros, now and after a remount), the others are as they were.
type DiscardError struct {
	Done int
	Err  error
}

func (e *DiscardError) Error() string { return e.Err.Error() }
func (e *DiscardError) Unwrap() error { return e.Err }

// punchHole gives back the space of n bytes at off in f. A variable so
// that tests can make it fail as a file system without hole punching
// does.
var punchHole = func(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// DiscardCows records that whole chunks were discarded through the mount:
// they read as zeros from now on, and each costs a key rather than a
// chunk of zeros. All of them go in one transaction, or in as few as
// Badger's limit on a transaction's size allows, since a VMM discards
// megabytes at a time; then their bytes are punched out of the
// written-data files. They are durable after the next Sync; it fails as
// WriteCow does, and with a *DiscardError when only some of the chunks
// were discarded.
func (c *Cache) DiscardCows(ids []overlay.ChunkID) error {
	if len(ids) == 0 {
		return nil
	}
	fail := func(err error) error {
		return fmt.Errorf("recording %d discarded chunks from %s chunk %d: %w", len(ids), ids[0].Image, ids[0].Index, err)
	}
	if err := c.room.check(); err != nil {
		return fail(err)
	}
	c.commitMu.Lock()
	defer c.commitMu.Unlock()
	done, err := c.setMarkers(ids, []byte{})
	if err != nil {
		err = fail(err)
		if done == 0 {
			return err
		}
		err = &DiscardError{Done: done, Err: err}
	}
	ids = ids[:done]
	c.mu.Lock()
	for _, id := range ids {
		delete(c.pending, id)
		c.state[id.Image][id.Index] = chunkDiscarded
	}
	c.mu.Unlock()
	// Give back the space of runs of chunks; a crash before the markers
	// are synced reads a punched chunk as zeros, which is what it was
	// discarded to. The markers already make the chunks read as zeros:
	// a punch that fails (a file system without hole punching, an I/O
	// error) only keeps their space taken, and the discard took effect.
	for i := 0; i < len(ids); {
		j := i + 1
		for j < len(ids) && ids[j].Image == ids[i].Image && ids[j].Index == ids[j-1].Index+1 {
			j++
		}
		f := c.written[ids[i].Image]
		if perr := punchHole(f, int64(ids[i].Index)*c.chunkSize, int64(j-i)*c.chunkSize); perr != nil {
			ev := c.room.log.Debug()
			if !c.punchFailed.Swap(true) {
				ev = c.room.log.Warn()
			}
			ev.Err(perr).Str("file", f.Name()).Msg("could not punch discarded chunks out of the written-data file: they read as zeros, but their space stays taken until the overlay's written data is dropped (--fresh)")
		} else {
			c.unsynced[ids[i].Image].Store(true)
		}
		i = j
	}
	return err
}

// DropWritten forgets every chunk written through mounts of this overlay.
func (c *Cache) DropWritten() error {
	c.commitMu.Lock()
	defer c.commitMu.Unlock()
	if err := c.db.DropPrefix([]byte("cow/")); err != nil {
		return err
	}
	if err := c.sync(); err != nil {
		return err
	}
	c.mu.Lock()
	clear(c.pending)
	for _, st := range c.state {
		clear(st)
	}
	c.mu.Unlock()
	// The markers are gone: the bytes are now only taking space.
	for img, f := range c.written {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if err := f.Truncate(c.sizes[img]); err != nil {
			return err
		}
	}
	return nil
}

// CowChunks lists the chunks that have been written, discarded ones too.
func (c *Cache) CowChunks() ([]overlay.ChunkID, error) {
	return c.cowChunks(false), nil
}

// DiscardedChunks lists the written chunks that were discarded.
func (c *Cache) DiscardedChunks() ([]overlay.ChunkID, error) {
	return c.cowChunks(true), nil
}

func (c *Cache) cowChunks(discarded bool) []overlay.ChunkID {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []overlay.ChunkID
	for img, sts := range c.state {
		for i, st := range sts {
			id := overlay.ChunkID{Image: overlay.Image(img), Index: uint32(i)}
			_, pending := c.pending[id]
			if discarded && st == chunkDiscarded && !pending || !discarded && (st != chunkNone || pending) {
				out = append(out, id)
			}
		}
	}
	return out
}
