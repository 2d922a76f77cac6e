// Package store is cloudletfs's state directory: a Badger registry of base
// VMs and their chunk-hash indexes, and per overlay a chunk cache and the
// data written through its mounts. It owns the layout; callers see records,
// not keys or paths.
//
// Several processes share a state directory. The registry is held only
// while a command reads or changes it (a mount holds it while it starts);
// an overlay's cache and written data are held by the one mount of that
// overlay for as long as it is mounted.
package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Store is an open state directory, holding its registry.
type Store struct {
	db        *badger.DB
	logs      *logSync
	dir       string
	lock      *os.File
	log       zerolog.Logger
	closeOnce sync.Once
	closeErr  error
}

// LockWait is how long Open waits for another process to let go of the
// registry.
var LockWait = 30 * time.Second

// DefaultDir is $XDG_DATA_HOME/cloudletfs, or ~/.local/share/cloudletfs.
func DefaultDir() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "cloudletfs")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "cloudletfs")
	}
	return filepath.Join(os.TempDir(), "cloudletfs")
}

// Open opens (creating if needed) the state directory dir and holds its
// registry until Close. One process holds the registry at a time; Open
// waits up to LockWait for another to let go.
func Open(dir string, log zerolog.Logger) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Opening Badger writes through its mappings.
	if err := freeSpace(dir, openReserve); err != nil {
		return nil, err
	}
	lock, err := lockFile(filepath.Join(dir, "lock"), LockWait)
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("state dir %s: another cloudletfs process has held its registry for %s (a base import?); try again when it is done", dir, LockWait)
	}
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Sized for a registry and its indexes, not for a database server.
	db, err := openDB(filepath.Join(dir, "db"), log, 16<<20)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	return &Store{db: db, logs: &logSync{db: db, dir: filepath.Join(dir, "db")}, dir: dir, lock: lock, log: log}, nil
}

// openDB opens a Badger database with small memtables and caches, sized
// by mem. Writes are not synced one by one, which costs a sync of Badger's
// logs per chunk written (10 to 50 times slower writes, see
// docs/BENCHMARKS.md): every operation that reports something done syncs
// with logSync first (an import, a removal, an fsync through the mount).
func openDB(path string, log zerolog.Logger, mem int64) (*badger.DB, error) {
	return badger.Open(badger.DefaultOptions(path).
		WithLogger(badgerLog{log}).
		WithSyncWrites(false).
		WithMemTableSize(mem).
		WithNumMemtables(2).
		WithBlockCacheSize(mem).
		WithValueLogFileSize(64 << 20).
		WithNumCompactors(2))
}

// logSync makes every write to a Badger database so far durable.
// Badger's own Sync covers only the active memtable's log and the newest
// value log: a memtable that filled up is flushed into a table by another
// goroutine, and until then the writes in it live only in its log, which
// nothing has synced; the same goes for a value log that was rotated. So
// the other memtable and value logs in the directory are synced too, and
// the directory itself when the logs' names changed. A log that vanishes
// meanwhile was flushed: Badger syncs a table and the manifest naming it
// before it deletes the log.
type logSync struct {
	db  *badger.DB
	dir string

	mu   sync.Mutex
	seen string // the logs' names when the directory was last synced
}

func (l *logSync) sync() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.db.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", l.dir, err)
	}
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", l.dir, err)
	}
	// Badger numbers logs in the order it makes them: the newest of each
	// kind is the one its Sync covered, or a newer one that holds only
	// writes that had not returned when this sync began.
	var logs []string
	newest := map[string]string{}
	for _, e := range ents {
		ext := filepath.Ext(e.Name())
		if ext != ".mem" && ext != ".vlog" {
			continue
		}
		logs = append(logs, e.Name())
		if n := e.Name(); len(n) > len(newest[ext]) || len(n) == len(newest[ext]) && n > newest[ext] {
			newest[ext] = n
		}
	}
	for _, n := range logs {
		if n == newest[filepath.Ext(n)] {
			continue
		}
		if err := fsyncPath(filepath.Join(l.dir, n), true); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("syncing %s: %w", l.dir, err)
		}
	}
	if names := strings.Join(logs, " "); names != l.seen {
		if err := fsyncPath(l.dir, false); err != nil {
			return fmt.Errorf("syncing %s: %w", l.dir, err)
		}
		l.seen = names
	}
	return nil
}

// fsyncPath syncs a file or directory by name; with data, only what
// reading the file back needs (fdatasync), not its times. Linux syncs every
// dirty page of the file, whichever descriptor or mapping dirtied it.
func fsyncPath(path string, data bool) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if data {
		return unix.Fdatasync(int(f.Fd()))
	}
	return f.Sync()
}

// sync makes every change to the registry so far durable.
func (s *Store) sync() error { return s.logs.sync() }

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

// Close flushes and closes the registry and lets other processes have it.
// Closing twice is harmless.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.db.Close()
		s.lock.Close()
	})
	return s.closeErr
}

// errLocked says another process holds a lock.
var errLocked = errors.New("locked by another process")

// lockFile opens path and takes an exclusive flock on it, waiting up to
// wait; with wait 0 it tries once. The lock goes with the returned file,
// and with the process if it dies.
func lockFile(path string, wait time.Duration) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		if !time.Now().Before(deadline) {
			f.Close()
			return nil, errLocked
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// errNotFound is wrapped by lookups that find nothing.
var errNotFound = errors.New("not found")

// badgerLog sends Badger's messages to zerolog. Badger warns and informs
// about its own housekeeping (compactions, a block-cache histogram across
// many lines): that is debug output for cloudletfs's users. Its errors are
// warnings at most, since every failure that matters to a command also
// comes back as an error from the call that met it. Each message is one
// line.
type badgerLog struct{ l zerolog.Logger }

func (b badgerLog) Errorf(f string, a ...any) { b.log(b.l.Warn(), f, a) }

func (b badgerLog) Warningf(f string, a ...any) { b.log(b.l.Debug(), f, a) }

func (b badgerLog) Infof(f string, a ...any) { b.log(b.l.Debug(), f, a) }

func (b badgerLog) Debugf(f string, a ...any) { b.log(b.l.Trace(), f, a) }

func (b badgerLog) log(e *zerolog.Event, f string, a []any) {
	// Badger logs on every memtable flush and compaction: formatting what
	// the level drops cost a noticeable share of a write-heavy mount's CPU.
	if !e.Enabled() {
		return
	}
	msg := strings.Join(strings.Fields(strings.ReplaceAll(strings.TrimSpace(fmt.Sprintf(f, a...)), "\n", " | ")), " ")
	e.Str("component", "badger").Msg(msg)
}
