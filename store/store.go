// Package store is cloudletfs's embedded state: one Badger database under the
// state directory that holds the base-VM registry and each base's chunk-hash
// index. It owns the key layout; callers see records, not keys.
package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/rs/zerolog"
)

// Store is an open state directory.
type Store struct {
	db  *badger.DB
	dir string
}

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

// Open opens (creating if needed) the state directory dir. Only one process
// can hold it at a time.
func Open(dir string, log zerolog.Logger) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	// Sized for a registry and its indexes, not for a database server:
	// small memtables and caches. Writes are not synced one by one; every
	// operation that reports something done calls Sync first (an import, a
	// removal, an fsync through the mount).
	opts := badger.DefaultOptions(filepath.Join(dir, "db")).
		WithLogger(badgerLog{log}).
		WithSyncWrites(false).
		WithMemTableSize(16 << 20).
		WithNumMemtables(2).
		WithBlockCacheSize(16 << 20).
		WithValueLogFileSize(64 << 20).
		WithNumCompactors(2)
	db, err := badger.Open(opts)
	if err != nil {
		if strings.Contains(err.Error(), "Cannot acquire directory lock") {
			return nil, fmt.Errorf("state dir %s is in use by another cloudletfs process", dir)
		}
		return nil, fmt.Errorf("state dir %s: %w", dir, err)
	}
	return &Store{db: db, dir: dir}, nil
}

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

// Close flushes and closes the database.
func (s *Store) Close() error { return s.db.Close() }

// errNotFound is wrapped by lookups that find nothing.
var errNotFound = errors.New("not found")

// badgerLog sends Badger's messages to zerolog, keeping its chatter at debug.
type badgerLog struct{ l zerolog.Logger }

func (b badgerLog) Errorf(f string, a ...any) {
	b.l.Error().Str("component", "badger").Msg(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (b badgerLog) Warningf(f string, a ...any) {
	b.l.Warn().Str("component", "badger").Msg(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (b badgerLog) Infof(f string, a ...any) {
	b.l.Debug().Str("component", "badger").Msg(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
func (b badgerLog) Debugf(f string, a ...any) {
	b.l.Trace().Str("component", "badger").Msg(strings.TrimSpace(fmt.Sprintf(f, a...)))
}
