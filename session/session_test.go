package session

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/store"
)

func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and /dev/fuse")
	}
}

// fixture is a state dir with a base and an overlay of a changed copy of
// it, and an empty mountpoint.
type fixture struct {
	dir, state, overlay, mnt string
	disk                     []byte // the custom VM's disk
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	fx := &fixture{dir: dir, state: filepath.Join(dir, "store"), overlay: filepath.Join(dir, "app.overlay"), mnt: filepath.Join(dir, "mnt")}
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	const c = 4096
	bd, bm := random(256*c), random(128*c)
	fx.disk = append([]byte(nil), bd...)
	copy(fx.disk[10*c:], random(40*c))
	for name, b := range map[string][]byte{"disk": bd, "memory": bm, "state": []byte("s0")} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(fx.mnt, 0o755)
	st, err := store.Open(fx.state, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec, err := st.Import("base", store.ImportFiles{Disk: filepath.Join(dir, "disk"), Memory: filepath.Join(dir, "memory"),
		State: filepath.Join(dir, "state")}, c, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	base, closeBase, err := st.Open(rec)
	if err != nil {
		t.Fatal(err)
	}
	defer closeBase()
	in := &overlay.Input{Images: [2]io.ReaderAt{bytes.NewReader(fx.disk), bytes.NewReader(bm)},
		Sizes: [2]int64{int64(len(fx.disk)), int64(len(bm))}, State: []byte("app state")}
	if _, err := overlay.Build(fx.overlay, base, in, overlay.BuildOptions{Codec: overlay.CodecZstd}); err != nil {
		t.Fatal(err)
	}
	return fx
}

func (fx *fixture) open(t *testing.T) *Session {
	t.Helper()
	s, err := Open(context.Background(), Options{Overlay: fx.overlay, Mountpoint: fx.mnt, StateDir: fx.state,
		Log: zerolog.Nop(), FetchTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// A child started while the mount is up, as launch starts QEMU, inherits
// no descriptor of the daemon: the FUSE device is close-on-exec from the
// moment it is opened, and qemu.CloseOnExec, which qemu.Start runs, marks
// what libraries opened without the flag.
func TestChildInheritsNoFUSEDevice(t *testing.T) {
	fx := newFixture(t)
	// Descriptors this process inherited without close-on-exec are not
	// the daemon's; a child inherits them as it would from a shell.
	before := inheritable(t)
	s := fx.open(t)
	got, err := os.ReadFile(filepath.Join(fx.mnt, "disk", "image"))
	if err != nil || !bytes.Equal(got, fx.disk) {
		t.Fatalf("disk through the mount differs (%v)", err)
	}
	// The daemon does hold the device: the checks below look for the
	// right thing.
	if len(fdsOf(t, os.Getpid(), func(n int, target string) bool { return target == "/dev/fuse" })) == 0 {
		t.Fatal("this process holds no /dev/fuse descriptor while mounted")
	}
	child := func() int {
		c := exec.Command("sleep", "600")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		// Look once it sleeps: while it starts, sleep opens files of its
		// own (the C library's locale files).
		deadline := time.Now().Add(10 * time.Second)
		for {
			b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(c.Process.Pid), "syscall"))
			if f := strings.Fields(string(b)); len(f) > 0 && (f[0] == "230" || f[0] == "35") {
				break // clock_nanosleep or nanosleep
			}
			if time.Now().After(deadline) {
				t.Fatalf("the child did not reach its sleep within 10 s (%q)", b)
			}
			runtime.Gosched()
		}
		return c.Process.Pid
	}
	if fuse := fdsOf(t, child(), func(n int, target string) bool { return target == "/dev/fuse" }); len(fuse) > 0 {
		t.Fatalf("a child inherited the FUSE device: %s", strings.Join(fuse, ", "))
	}
	qemu.CloseOnExec()
	if extra := fdsOf(t, child(), func(n int, target string) bool { return n > 2 && !before[n] }); len(extra) > 0 {
		t.Fatalf("a child inherited descriptors of the daemon: %s", strings.Join(extra, ", "))
	}
	if err := s.Unmount(false); err != nil {
		t.Fatal(err)
	}
	if fstype, _ := MountType(s.Dir); fstype != "" {
		t.Fatalf("still mounted (%s) after Unmount", fstype)
	}
}

// fdsOf lists the descriptors of process pid that match.
func fdsOf(t *testing.T, pid int, match func(n int, target string) bool) []string {
	t.Helper()
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, fd := range fds {
		n, _ := strconv.Atoi(fd.Name())
		target, _ := os.Readlink(filepath.Join(dir, fd.Name()))
		if match(n, target) {
			got = append(got, fd.Name()+" -> "+target)
		}
	}
	return got
}

// inheritable returns the descriptors of this process that lack
// close-on-exec.
func inheritable(t *testing.T) map[int]bool {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	m := map[int]bool{}
	for _, fd := range fds {
		n, _ := strconv.Atoi(fd.Name())
		if flags, err := unix.FcntlInt(uintptr(n), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			m[n] = true
		}
	}
	return m
}

// A stop while a process holds a file of the mount is refused and names
// the holder; the mount keeps serving. A forced stop detaches it.
func TestUnmountRefusedWhileHeld(t *testing.T) {
	fx := newFixture(t)
	s := fx.open(t)
	holder := exec.Command("sleep", "600")
	f, err := os.Open(filepath.Join(fx.mnt, "disk", "image"))
	if err != nil {
		t.Fatal(err)
	}
	holder.Stdin = f
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer func() { holder.Process.Kill(); holder.Wait() }()
	err = s.Unmount(false)
	busy, ok := err.(*BusyError)
	if !ok {
		t.Fatalf("Unmount with a holder: %v, want a *BusyError", err)
	}
	found := false
	for _, h := range busy.Holders {
		found = found || (h.PID == holder.Process.Pid && h.Command == "sleep")
	}
	if !found || !strings.Contains(err.Error(), "sleep (pid "+strconv.Itoa(holder.Process.Pid)+")") {
		t.Fatalf("the holder is not named: %v", err)
	}
	got, err := os.ReadFile(filepath.Join(fx.mnt, "disk", "image"))
	if err != nil || !bytes.Equal(got, fx.disk) {
		t.Fatalf("the mount stopped serving after a refused stop (%v)", err)
	}
	if err := s.Unmount(true); err != nil {
		t.Fatal(err)
	}
	if fstype, _ := MountType(s.Dir); fstype != "" {
		t.Fatalf("still mounted (%s) after a forced Unmount", fstype)
	}
}

// With DropWritten, what was written through the mount is gone from the
// overlay's cache once the session closes; without it, it stays.
func TestDropWrittenAtClose(t *testing.T) {
	fx := newFixture(t)
	for _, drop := range []bool{false, true} {
		s, err := Open(context.Background(), Options{Overlay: fx.overlay, Mountpoint: fx.mnt, StateDir: fx.state,
			Log: zerolog.Nop(), FetchTimeout: 10 * time.Second, DropWritten: drop})
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(filepath.Join(fx.mnt, "disk", "image"), os.O_WRONLY, 0)
		if err != nil {
			s.Close()
			t.Fatal(err)
		}
		_, err = f.WriteAt(bytes.Repeat([]byte{7}, 8192), 4096)
		if err == nil {
			err = f.Sync()
		}
		f.Close()
		id := s.Overlay.ID
		s.Close()
		if err != nil {
			t.Fatal(err)
		}
		st, err := store.Open(fx.state, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		cache, err := st.OpenCache(id, int(s.Overlay.Header.ChunkSize), [2]int64{s.Overlay.Header.ImageSize(overlay.Disk), s.Overlay.Header.ImageSize(overlay.Memory)})
		if err != nil {
			st.Close()
			t.Fatal(err)
		}
		written, err := cache.CowChunks()
		cache.Close()
		st.Close()
		if err != nil {
			t.Fatal(err)
		}
		if drop && len(written) > 0 {
			t.Fatalf("DropWritten: %d written chunks left in the cache after Close", len(written))
		}
		if !drop && len(written) == 0 {
			t.Fatal("without DropWritten the written chunks are gone too: the test cannot tell")
		}
	}
}
