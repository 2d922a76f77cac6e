package cloudlet

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	badger "github.com/dgraph-io/badger/v4"
)

// record is what the registry keeps of a VM: enough for a daemon that
// starts again to find its worker, or to report it ended.
type record struct {
	VM        VM     `json:"vm"`
	OverlayID string `json:"overlay_id"`
	Dir       string `json:"dir"`
	// Worker is the worker's process: its PID and its start time in
	// clock ticks since boot, which tells it from a later process that
	// got the same PID.
	WorkerPid   int    `json:"worker_pid"`
	WorkerStart uint64 `json:"worker_start"`
	// HostPorts are the host ports the VM was given.
	HostPorts []int `json:"host_ports,omitempty"`
}

// registry is the daemon's Badger database of VMs, under
// <state dir>/cloudlet/db. One daemon holds it at a time.
type registry struct{ db *badger.DB }

func openRegistry(dir string) (*registry, error) {
	// A registry of a few VMs: small tables and caches. Each write is
	// synced, since a VM admitted must be found again after a crash.
	opts := badger.DefaultOptions(dir).WithLogger(nil).WithSyncWrites(true).
		WithMemTableSize(8 << 20).WithNumMemtables(2).WithBlockCacheSize(8 << 20).
		WithValueLogFileSize(16 << 20).WithNumCompactors(2)
	db, err := badger.Open(opts)
	if err != nil {
		if strings.Contains(err.Error(), "Cannot acquire directory lock") {
			return nil, fmt.Errorf("cloudlet registry %s is held by another cloudletfs cloudlet daemon: one daemon serves a state dir", dir)
		}
		return nil, fmt.Errorf("cloudlet registry %s: %w", dir, err)
	}
	return &registry{db: db}, nil
}

func vmKey(id string) []byte { return []byte("vm/" + id) }

// put records r, durably: a VM the daemon admitted is found again after
// a crash.
func (g *registry) put(r *record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return g.db.Update(func(txn *badger.Txn) error { return txn.Set(vmKey(r.VM.ID), b) })
}

func (g *registry) remove(id string) error {
	return g.db.Update(func(txn *badger.Txn) error { return txn.Delete(vmKey(id)) })
}

// all returns every VM recorded, oldest request first.
func (g *registry) all() ([]*record, error) {
	var out []*record
	err := g.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("vm/")})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			err := it.Item().Value(func(v []byte) error {
				var r record
				if err := json.Unmarshal(v, &r); err != nil {
					return fmt.Errorf("registry entry %s: %w", it.Item().Key(), err)
				}
				out = append(out, &r)
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}

func (g *registry) close() error { return g.db.Close() }

// procStart returns the start time of process pid in clock ticks since
// boot, and whether it runs (a zombie does not).
func procStart(pid int) (uint64, bool) {
	if pid <= 0 {
		return 0, false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, false
	}
	// The command name, in parentheses, may hold spaces: the fields
	// that follow are counted from its end.
	s := string(b)
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return 0, false
	}
	f := strings.Fields(s[end+1:])
	// f[0] is field 3 (state), f[19] field 22 (starttime).
	if len(f) < 20 || f[0] == "Z" || f[0] == "X" {
		return 0, false
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	return start, err == nil
}

// alive reports whether the process recorded as pid, started at start,
// still runs.
func alive(pid int, start uint64) bool {
	s, ok := procStart(pid)
	return ok && s == start
}

// signal sends sig to the recorded process if it is still that process.
func signal(pid int, start uint64, sig syscall.Signal) error {
	if !alive(pid, start) {
		return errors.New("no such process")
	}
	return syscall.Kill(pid, sig)
}
