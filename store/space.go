package store

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// SpaceReserve is the free space a write to an overlay's database leaves
// on the state dir's file system. Badger writes through memory mappings of
// sparse files: its memtable's log, the tables a flush or a compaction
// writes. On a full disk such a write does not fail, the process gets
// SIGBUS. So every write through a mount first checks that this much is
// free and fails with ENOSPC otherwise; writes that need no new space (a
// chunk overwritten in place, the one-byte markers of chunks taken before)
// go on below it, since refusing them would lose writes the guest was
// told succeeded. The reserve covers what Badger can
// still write without another check, for the options openDB sets: the rest
// of the memtable's log (at most 8 MiB), flushing the two memtables into
// tables (about 16 MiB), and a compaction of level 0 into level 1 (at most
// 15 tables of 8 MiB and the 10 MiB of level 1). Compactions of deeper
// levels merge a table with the tables it overlaps below, which no option
// bounds: a database holding gigabytes of written data could in principle
// need more than the reserve for one of them.
var SpaceReserve int64 = 256 << 20

// openReserve is the free space Open needs: opening the registry writes a
// new memtable log and value log header, and commands such as `cache gc`
// that free space must still work when writes through mounts are refused.
const openReserve = 32 << 20

// room checks, before a write, that a state dir is writable and has the
// reserve free, and logs once when that stops or starts being so.
type room struct {
	dir   string
	probe *os.File // a file of the state dir that is held open for writing
	log   zerolog.Logger

	mu      sync.Mutex
	failing error // the error last logged, nil while writes go through
}

// check returns an error wrapping syscall.ENOSPC or syscall.EROFS when
// the state dir cannot take a write.
func (r *room) check() error {
	err := r.probeWrite()
	if err == nil {
		err = freeSpace(r.dir, SpaceReserve)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case err != nil && r.failing == nil:
		r.log.Error().Msgf("%v; reads go on", err)
	case err == nil && r.failing != nil:
		r.log.Info().Str("state_dir", r.dir).Msg("the state dir takes writes again")
	}
	r.failing = err
	return err
}

// checkWritable is check without the reserve, for writes that take no
// new space, or bytes for what the reserve is kept (the markers of chunks
// already taken): it fails only on a state dir that went read-only.
func (r *room) checkWritable() error {
	err := r.probeWrite()
	if err != nil {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.failing == nil {
			r.log.Error().Msgf("%v; reads go on", err)
		}
		r.failing = err
	}
	return err
}

// probeWrite rewrites the first byte of the probe file in place, which
// needs no new space. It finds a file system that went read-only under
// open files (ext4 after an error does, and statfs does not say so),
// before a write through one of Badger's mappings meets it as SIGBUS.
func (r *room) probeWrite() error {
	if r.probe == nil {
		return nil
	}
	_, err := r.probe.WriteAt([]byte{'l'}, 0)
	if errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("state dir %s is read-only: writes fail with EROFS until it is writable again and the overlay is mounted anew: %w", r.dir, syscall.EROFS)
	}
	if err != nil {
		return fmt.Errorf("state dir %s: %w", r.dir, err)
	}
	return nil
}

// freeSpace fails with an error wrapping syscall.ENOSPC unless the file
// system of dir has at least reserve bytes free for this process, or
// wrapping syscall.EROFS if it is mounted read-only.
func freeSpace(dir string, reserve int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("state dir %s: %w", dir, err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return fmt.Errorf("state dir %s is on a read-only file system: %w", dir, syscall.EROFS)
	}
	// Bavail, not Bfree: what an unprivileged process may use. A daemon
	// running as root has the blocks the file system keeps for root on
	// top of the reserve.
	if free := int64(st.Bavail) * st.Bsize; free < reserve {
		return fmt.Errorf("state dir %s is full: %s free, under the %s kept free so that its database never meets a full disk: free some space (`cloudletfs cache gc --cache-size` removes cached overlays); writes fail with ENOSPC until then: %w",
			dir, humanize.IBytes(uint64(free)), humanize.IBytes(uint64(reserve)), syscall.ENOSPC)
	}
	return nil
}
