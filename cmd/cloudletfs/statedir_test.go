package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/store"
)

// mountFS mounts a file system for the test and unmounts it when the test
// is done, after everything registered later.
func mountFS(t *testing.T, dir string, args ...string) {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	if out, err := exec.Command("mount", append(args, dir)...).CombinedOutput(); err != nil {
		t.Skipf("mount %v: %v: %s", args, err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
}

// mountOnState mounts the app overlay, read from a file, with the state
// dir e.state, reads both images whole (so every segment is cached) and
// returns the mount and its mountpoint.
func mountOnState(t *testing.T, e *env) (*proc, string) {
	t.Helper()
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	m := e.mount(e.path("srv/app.overlay"), mnt)
	for _, img := range []string{"disk", "memory"} {
		if got, want := readFile(t, filepath.Join(mnt, img, "image")), e.read("app/"+img+".img"); !bytes.Equal(got, want) {
			t.Fatalf("%s/image differs from the app's", img)
		}
	}
	return m, mnt
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writeUntil writes 64 KiB pieces to the disk image through the mount,
// round and round the image, until a write fails or total bytes are
// written. It returns the disk as it should read now, the bytes written and
// the error.
func writeUntil(t *testing.T, e *env, mnt string, disk []byte, total int) ([]byte, int, error) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(mnt, "disk", "image"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if disk == nil {
		disk = e.read("app/disk.img")
	}
	piece := make([]byte, 64<<10)
	done := 0
	for done < total {
		off := done % (len(disk) / len(piece) * len(piece))
		copy(piece, fmt.Sprintf("written at %d through the mount", done))
		// One pwrite at a time: os.File.WriteAt drops the count of a
		// short write that it retries into an error.
		n, err := unix.Pwrite(int(f.Fd()), piece, int64(off))
		if n > 0 {
			copy(disk[off:], piece[:n])
			done += n
		}
		if err != nil {
			return disk, done, err
		}
	}
	return disk, done, f.Sync()
}

// checkAlive asserts that the mount still serves: the disk reads back as
// disk, the memory as the app's, and stats answers.
func checkAlive(t *testing.T, e *env, m *proc, mnt string, disk []byte) {
	t.Helper()
	if got := readFile(t, filepath.Join(mnt, "disk", "image")); !bytes.Equal(got, disk) {
		i := 0
		for i < len(got) && i < len(disk) && got[i] == disk[i] {
			i++
		}
		t.Fatalf("disk/image does not read back as the app's disk with the writes that succeeded: first difference at %d of %d/%d: %q, want %q", i, len(got), len(disk), got[i:min(len(got), i+40)], disk[i:min(len(disk), i+40)])
	}
	if got := readFile(t, filepath.Join(mnt, "memory", "image")); !bytes.Equal(got, e.read("app/memory.img")) {
		t.Fatal("memory/image changed")
	}
	var st map[string]any
	if err := json.Unmarshal(readFile(t, filepath.Join(mnt, "stats")), &st); err != nil {
		t.Fatalf("stats: %v", err)
	}
	select {
	case err := <-m.done:
		t.Fatalf("the daemon exited: %v; stderr:\n%s", err, m.errText())
	default:
	}
	if s := m.errText(); strings.Contains(s, "SIGBUS") || strings.Contains(s, "fault") {
		t.Fatalf("the daemon faulted:\n%s", s)
	}
}

// A mount whose state dir fills up: writes through it fail with ENOSPC
// before Badger's mapped logs could meet the full disk (SIGBUS), the
// daemon says so in one line and keeps serving reads, and writes work
// again once there is room.
func TestFullStateDir(t *testing.T) {
	requireFUSE(t)
	// An 8 MiB disk: a chunk written before is overwritten in place and
	// takes no more space, so the writes must reach more new chunks than
	// the 2 MiB above the reserve below.
	e := bigEnv(t, 2048, 1024)
	e.state = e.path("state-tmpfs")
	mountFS(t, e.state, "-t", "tmpfs", "-o", "size="+strconv.FormatInt(store.SpaceReserve+48<<20, 10), "tmpfs")
	m, mnt := mountOnState(t, e)

	filler := filepath.Join(e.state, "filler")
	// fill leaves leave bytes free on the state dir.
	fill := func(leave int64) {
		t.Helper()
		os.Remove(filler)
		var st unix.Statfs_t
		if err := unix.Statfs(e.state, &st); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(filler)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(st.Bavail)*st.Bsize-leave); err != nil {
			t.Fatal(err)
		}
	}

	// Full to the last MiB: Badger's mapped log would fault on it.
	fill(1 << 20)
	disk, n, err := writeUntil(t, e, mnt, nil, 16<<20)
	if !errors.Is(err, syscall.ENOSPC) || n != 0 {
		t.Fatalf("writing 16 MiB to a mount whose state dir has 1 MiB free: %v after %d bytes, want ENOSPC at once", err, n)
	}
	checkAlive(t, e, m, mnt, disk)
	// One line says so, however many writes fail.
	if n := strings.Count(m.errText(), "is full"); n != 1 {
		t.Fatalf("%d lines say the state dir is full, want 1:\n%s", n, m.errText())
	}

	// 2 MiB above the reserve: writes go through up to the reserve.
	fill(store.SpaceReserve + 2<<20)
	disk, n, err = writeUntil(t, e, mnt, disk, 16<<20)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("writing 16 MiB with 2 MiB above the reserve: %v after %d bytes, want ENOSPC", err, n)
	}
	if n == 0 {
		t.Fatal("no write succeeded with 2 MiB above the reserve")
	}
	checkAlive(t, e, m, mnt, disk)
	if n := strings.Count(m.errText(), "is full"); n != 2 || !strings.Contains(m.errText(), "takes writes again") {
		t.Fatalf("%d lines say the state dir is full, want 2, with one that says it takes writes again between them:\n%s", n, m.errText())
	}

	os.Remove(filler)
	disk, _, err = writeUntil(t, e, mnt, disk, 1<<20)
	if err != nil {
		t.Fatalf("writing once there is room again: %v", err)
	}
	checkAlive(t, e, m, mnt, disk)
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount exited with %v; stderr:\n%s", err, m.errText())
	}
}

// A mount whose state dir turns read-only (ext4 after an error, with
// errors=remount-ro: the kernel refuses to remount a file system read-only
// while files on it are open for writing) fails writes with EROFS, keeps
// serving reads, and unmounts.
func TestReadOnlyStateDir(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	img := e.path("state.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, store.SpaceReserve+512<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4: %v: %s", err, out)
	}
	e.state = e.path("state-ext4")
	mountFS(t, e.state, "-o", "loop,errors=remount-ro", img)
	src, err := exec.Command("findmnt", "-n", "-o", "SOURCE", e.state).Output()
	if err != nil {
		t.Fatal(err)
	}
	trigger := filepath.Join("/sys/fs/ext4", filepath.Base(strings.TrimSpace(string(src))), "trigger_fs_error")
	if _, err := os.Stat(trigger); err != nil {
		t.Skipf("no %s to make the file system fail", trigger)
	}
	m, mnt := mountOnState(t, e)
	disk, _, err := writeUntil(t, e, mnt, nil, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(trigger, []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	if _, n, err := writeUntil(t, e, mnt, bytes.Clone(disk), 4<<20); !errors.Is(err, syscall.EROFS) || n != 0 {
		t.Fatalf("writing to a mount whose state dir is read-only: %v after %d bytes, want EROFS at once", err, n)
	}
	checkAlive(t, e, m, mnt, disk)
	if n := strings.Count(m.errText(), "is read-only"); n != 1 {
		t.Fatalf("%d lines say the state dir is read-only, want 1:\n%s", n, m.errText())
	}
	e.ok("umount", mnt)
	// It exits: its cache cannot be closed cleanly, and is left for the
	// next open to replay.
	m.wait(t)
}

// The base commands as a user meets them: list --json prints digests in
// hex; verify after a touch makes the base usable again; rm refuses while
// an overlay on the base is mounted; rm of a base whose files are in the
// state dir, as base create leaves them, removes them.
func TestBaseCommands(t *testing.T) {
	e := newEnv(t)
	id := e.importBase("base", "base")

	var list []map[string]any
	if err := json.Unmarshal([]byte(e.ok("base", "list", "--json")), &list); err != nil || len(list) != 1 {
		t.Fatalf("base list --json: %v %v", list, err)
	}
	disk, _ := list[0]["disk"].(map[string]any)
	if list[0]["id"] != id || len(fmt.Sprint(disk["sha256"])) != 64 {
		t.Fatalf("base list --json does not print hex digests: %v", list[0])
	}
	if sum := sha256Hex(e.read("base/disk.img")); disk["sha256"] != sum {
		t.Fatalf("disk sha256 %v, want %s", disk["sha256"], sum)
	}

	later := time.Now().Add(time.Hour)
	os.Chtimes(e.path("base/disk.img"), later, later)
	e.fails([]string{"changed since import", "base verify"}, "overlay", "create", "--base", "base", "--disk", e.path("app/disk.img"),
		"--memory", e.path("app/memory.img"), "--state", e.path("app/state"), "-o", e.path("srv/app.overlay"))
	if out := e.ok("base", "verify", "base"); !strings.Contains(out, "can be used again") {
		t.Fatalf("verify of a touched base: %q", out)
	}
	e.create("srv/app.overlay")

	t.Run("rm while mounted", func(t *testing.T) {
		requireFUSE(t)
		e := e.in(t)
		mnt := e.path("mnt")
		os.MkdirAll(mnt, 0o755)
		t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
		m := e.mount(e.path("srv/app.overlay"), mnt)
		e.fails([]string{"in use", "mounted"}, "base", "rm", "base")
		// A base truncated under the mount gives errors, not zeros.
		if err := os.Truncate(e.path("base/disk.img"), 4096); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(mnt, "disk", "image")); !errors.Is(err, syscall.EIO) {
			t.Fatalf("reading an overlay whose base was truncated under the mount: %d bytes, %v; want EIO", len(b), err)
		}
		if !strings.Contains(m.errText(), "changed while in use") {
			t.Fatalf("the daemon does not say the base changed:\n%s", m.errText())
		}
		e.ok("umount", mnt)
		if err := m.wait(t); err != nil {
			t.Fatalf("mount: %v; stderr:\n%s", err, m.errText())
		}
	})

	e.ok("base", "rm", "base")
	for _, f := range []string{"base/disk.img", "base/memory.img", "base/state"} {
		if _, err := os.Stat(e.path(f)); err != nil {
			t.Fatalf("rm of an imported base removed %s: %v", f, err)
		}
	}

	// Laid out as base create leaves a base: a base-* directory in the
	// state dir with the images, the state, vm.json and the kernel.
	made := filepath.Join(e.state, "base-made-1")
	os.MkdirAll(made, 0o700)
	for _, f := range []string{"disk.img", "memory.img", "state"} {
		if err := os.WriteFile(filepath.Join(made, f), e.read("base/"+f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(made, "vm.json"), []byte(`{}`), 0o644)
	os.WriteFile(filepath.Join(made, "vmlinuz"), []byte("kernel"), 0o644)
	e.ok("base", "import", "--name", "made", "--disk", filepath.Join(made, "disk.img"), "--memory", filepath.Join(made, "memory.img"),
		"--state", filepath.Join(made, "state"), "--vm-config", filepath.Join(made, "vm.json"))
	if out := e.ok("base", "rm", "made"); !strings.Contains(out, "removed its files in "+made) {
		t.Fatalf("base rm of a made base: %q", out)
	}
	if _, err := os.Stat(made); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the made base's directory is still there: %v", err)
	}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
