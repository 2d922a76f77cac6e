package session

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// FSType is the file system type a cloudletfs mount shows in
// /proc/self/mountinfo.
const FSType = "fuse.cloudletfs"

// checkMountpoint refuses a missing mountpoint, one that is not a
// directory, and one that already has something mounted on it. A dead
// cloudletfs mount, left by a daemon that was killed, is cleaned away.
func checkMountpoint(dir string, log zerolog.Logger) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if fstype, err := MountType(abs); err != nil {
		return "", err
	} else if fstype != "" {
		if !IsDead(abs) {
			return "", fmt.Errorf("mountpoint %s is busy: something is already mounted there", dir)
		}
		if fstype != FSType {
			return "", fmt.Errorf("mountpoint %s holds a dead %s mount, not cloudletfs's: unmount it first", dir, fstype)
		}
		if err := CleanDead(abs); err != nil {
			return "", fmt.Errorf("mountpoint %s: %w", dir, err)
		}
		log.Warn().Str("mountpoint", abs).Msg("cleaned a dead mount left by a cloudletfs daemon that stopped without unmounting")
	}
	st, err := os.Stat(abs)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("mountpoint %s does not exist: create the directory first", dir)
		}
		return "", fmt.Errorf("mountpoint %s: %w", dir, err)
	}
	if !st.IsDir() {
		return "", fmt.Errorf("mountpoint %s is not a directory", dir)
	}
	return abs, nil
}

// CleanDead detaches the dead mount at abs. Lazily: a process of the
// stopped daemon's VM may still hold files there; they keep failing, and
// the mountpoint is free now.
func CleanDead(abs string) error {
	if err := syscall.Unmount(abs, syscall.MNT_DETACH); err != nil {
		return fmt.Errorf("a dead mount that cannot be cleaned: %w", err)
	}
	return nil
}

// IsDead reports whether the FUSE daemon behind the mount at abs is gone:
// every access then fails with ENOTCONN. Cached attributes can hide that
// from a plain stat, so it lists the directory. A daemon that is alive but
// does not answer is not dead; the listing is given up on after a moment
// so that its caller does not hang with it.
func IsDead(abs string) bool {
	res := make(chan error, 1)
	go func() {
		_, err := os.ReadDir(abs)
		res <- err
	}()
	select {
	case err := <-res:
		return errors.Is(err, syscall.ENOTCONN)
	case <-time.After(2 * time.Second):
		return false
	}
}

// MountType returns the file system type of the mount at abs, or "" when
// abs is not a mount point, from /proc/self/mountinfo.
func MountType(abs string) (string, error) {
	ms, err := mounts()
	if err != nil {
		return "", err
	}
	fstype := ""
	for _, m := range ms {
		if m.dir == abs {
			fstype = m.fstype // the last match is the mount on top
		}
	}
	return fstype, nil
}

// CleanDeadMounts detaches the dead cloudletfs mounts whose mountpoints
// match pattern (as filepath.Match) and removes those mountpoints, which
// only a cloudletfs process that was killed leaves behind, as `launch`
// makes its mountpoints itself.
func CleanDeadMounts(pattern string, log zerolog.Logger) {
	ms, err := mounts()
	if err != nil {
		return
	}
	for _, m := range ms {
		if ok, _ := filepath.Match(pattern, m.dir); !ok || m.fstype != FSType || !IsDead(m.dir) {
			continue
		}
		if err := CleanDead(m.dir); err != nil {
			log.Warn().Err(err).Str("mountpoint", m.dir).Msg("a dead mount left by a killed cloudletfs")
			continue
		}
		os.Remove(m.dir)
		log.Warn().Str("mountpoint", m.dir).Msg("cleaned a dead mount left by a cloudletfs daemon that stopped without unmounting")
	}
}

type mount struct{ dir, fstype string }

// mounts lists this mount namespace's mounts, bottom first.
func mounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var ms []mount
	for sc.Scan() {
		// ID parent major:minor root mountpoint options [optional...] - type source super
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) <= 4 {
			continue
		}
		m := mount{dir: unescapeMount(fields[4]), fstype: "unknown"}
		_, after, _ := strings.Cut(line, " - ")
		if t := strings.Fields(after); len(t) > 0 {
			m.fstype = t[0]
		}
		ms = append(ms, m)
	}
	return ms, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes of space, tab, newline and
// backslash.
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// Holder is a process that holds a file under a mountpoint: open, mapped,
// or as its working directory.
type Holder struct {
	PID     int
	Command string
}

// Holders lists the processes that hold files under the mountpoint abs,
// from /proc/*/fd, /proc/*/maps and /proc/*/cwd. Processes it may not look
// into are skipped.
func Holders(abs string) ([]Holder, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	under := func(p string) bool {
		p = strings.TrimSuffix(p, " (deleted)")
		return p == abs || strings.HasPrefix(p, abs+"/")
	}
	var hs []Holder
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		if holds(dir, under) {
			comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
			hs = append(hs, Holder{PID: pid, Command: strings.TrimSpace(string(comm))})
		}
	}
	return hs, nil
}

// holds reports whether the process at /proc/PID holds a path under.
func holds(dir string, under func(string) bool) bool {
	if p, err := os.Readlink(filepath.Join(dir, "cwd")); err == nil && under(p) {
		return true
	}
	fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
	for _, fd := range fds {
		if p, err := os.Readlink(filepath.Join(dir, "fd", fd.Name())); err == nil && under(p) {
			return true
		}
	}
	f, err := os.Open(filepath.Join(dir, "maps"))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// address perms offset dev inode path
		fields := strings.SplitN(sc.Text(), " ", 6)
		if len(fields) == 6 && under(strings.TrimLeft(fields[5], " ")) {
			return true
		}
	}
	return false
}

// describe names holders as "qemu-system-x86 (pid 123), ...".
func describe(hs []Holder) string {
	if len(hs) == 0 {
		return "a process that could not be named"
	}
	var b strings.Builder
	for i, h := range hs {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s (pid %d)", h.Command, h.PID)
	}
	return b.String()
}
