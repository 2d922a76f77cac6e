package fs_test

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// The tree is fixed. Every change to a name, a directory or a read-only
// file fails with EPERM, and the images' size cannot change, even for
// root, whom no mode bit stops.
func TestTreeRefusesChanges(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		t.Fatal("this test must run as root, whom mode bits do not stop")
	}
	at := func(name string) string { return filepath.Join(m.dir, name) }
	eperm := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s: %v, want EPERM", what, err)
		}
	}
	readOnly := []string{"state", "vm.json", "stats", "streams/chunks_accessed", "streams/chunks_fetched", "streams/chunks_modified", "streams/io"}
	before := map[string][]byte{}
	for _, name := range []string{"state", "vm.json"} {
		if before[name], err = os.ReadFile(at(name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range readOnly {
		p := at(name)
		eperm("unlink "+name, syscall.Unlink(p))
		eperm("truncate "+name, os.Truncate(p, 0))
		for _, flag := range []int{os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC} {
			f, err := os.OpenFile(p, flag, 0)
			if err == nil {
				f.Close()
			}
			eperm("open "+name+" for writing", err)
		}
		eperm("chmod "+name, os.Chmod(p, 0o666))
		eperm("chown "+name, os.Chown(p, 1, 1))
		eperm("rename "+name, os.Rename(p, at("renamed")))
		eperm("link "+name, os.Link(p, at("linked")))
	}
	for name, b := range before {
		if got, err := os.ReadFile(at(name)); err != nil || string(got) != string(b) {
			t.Errorf("%s changed: %q (%v), was %q", name, got, err, b)
		}
	}
	for _, dir := range []string{"", "disk", "memory", "streams"} {
		p := at(dir)
		f, err := os.OpenFile(filepath.Join(p, "new"), os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			f.Close()
		}
		eperm("create in "+dir+"/", err)
		eperm("mkdir in "+dir+"/", os.Mkdir(filepath.Join(p, "newdir"), 0o755))
		eperm("symlink in "+dir+"/", os.Symlink("state", filepath.Join(p, "newlink")))
		eperm("mkfifo in "+dir+"/", syscall.Mkfifo(filepath.Join(p, "newfifo"), 0o644))
		eperm("chmod "+dir+"/", os.Chmod(p, 0o777))
		if dir != "" { // the mount point itself is the kernel's to refuse
			eperm("rmdir "+dir, syscall.Rmdir(p))
			eperm("rename "+dir, os.Rename(p, at("renamed")))
		}
	}
	for _, img := range overlay.Images {
		p := m.path(img)
		size := int64(len(v.want[img]))
		eperm("unlink "+img.String(), syscall.Unlink(p))
		eperm("rename "+img.String(), os.Rename(p, p+".old"))
		eperm("rename "+img.String()+" to the root", os.Rename(p, at("image")))
		for _, sz := range []int64{0, size - 1, size + 1, 2 * size} {
			eperm("truncate "+img.String(), os.Truncate(p, sz))
		}
		if err := os.Truncate(p, size); err != nil {
			t.Errorf("truncate %s to its own size: %v", img, err)
		}
		eperm("chmod "+img.String(), os.Chmod(p, 0o777))
		eperm("chown "+img.String(), os.Chown(p, 1, 1))
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		eperm("ftruncate "+img.String(), f.Truncate(size+4096))
		eperm("open "+img.String()+" with O_TRUNC", func() error {
			f, err := os.OpenFile(p, os.O_RDWR|os.O_TRUNC, 0)
			if err == nil {
				f.Close()
			}
			return err
		}())
		// A write that starts at the end fails, and so does one that runs
		// over it (the kernel reports the failure of its last part).
		if _, err := f.WriteAt([]byte("past the end"), size); !errors.Is(err, syscall.EFBIG) {
			t.Errorf("write at the end of %s: %v, want EFBIG", img, err)
		}
		if _, err := f.WriteAt([]byte("over the end"), size-4); !errors.Is(err, syscall.EFBIG) {
			t.Errorf("write over the end of %s: %v, want EFBIG", img, err)
		}
		if err := syscall.Fallocate(int(f.Fd()), 0, size, 4096); err == nil {
			t.Errorf("fallocate past the end of %s succeeded", img)
		}
		f.Close()
		a, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Write([]byte("appended")); !errors.Is(err, syscall.EFBIG) {
			t.Errorf("append to %s: %v, want EFBIG", img, err)
		}
		a.Close()
		if fi, err := os.Stat(p); err != nil || fi.Size() != size {
			t.Errorf("%s: size now %v (%v), want %d", img, fi.Size(), err, size)
		}
	}
}

// Files and directories look like a disk file system's: one link per file,
// two plus one per subdirectory for a directory, and real times. An
// image's mtime stays put while it is only read, and follows its writes.
func TestTreeAttributes(t *testing.T) {
	v := newVM(t, overlay.CodecZstd, 64<<10)
	srv := newServer(t, filepath.Dir(v.overlay), 0, 0)
	before := time.Now().Add(-time.Second) // slack for a coarse clock
	m, err := v.mount(t, srv.URL+"/app.overlay", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	stat := func(name string) *syscall.Stat_t {
		t.Helper()
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(m.dir, name), &st); err != nil {
			t.Fatal(err)
		}
		return &st
	}
	ts := func(s syscall.Timespec) time.Time { return time.Unix(s.Unix()) }
	sane := func(name string, st *syscall.Stat_t) {
		t.Helper()
		now := time.Now().Add(time.Second)
		for what, at := range map[string]time.Time{"atime": ts(st.Atim), "mtime": ts(st.Mtim), "ctime": ts(st.Ctim)} {
			if at.Before(before) || at.After(now) {
				t.Errorf("%s: %s %s, not between the mount and now", name, what, at)
			}
		}
	}
	for dir, links := range map[string]uint64{"": 5, "disk": 2, "memory": 2, "streams": 2} {
		st := stat(dir)
		if st.Nlink != links || st.Mode != syscall.S_IFDIR|0o555 {
			t.Errorf("%s/: nlink %d mode %o, want %d and %o", dir, st.Nlink, st.Mode, links, syscall.S_IFDIR|0o555)
		}
		sane(dir+"/", st)
	}
	for _, name := range []string{"state", "vm.json", "stats", "streams/io", "disk/image", "memory/image"} {
		st := stat(name)
		if st.Nlink != 1 {
			t.Errorf("%s: nlink %d, want 1", name, st.Nlink)
		}
		sane(name, st)
	}
	img := filepath.Join("disk", "image")
	mt := stat(img).Mtim
	if _, err := m.readAt(overlay.Disk, 0, 100000); err != nil {
		t.Fatal(err)
	}
	if got := stat(img).Mtim; got != mt {
		t.Fatalf("a read moved the image's mtime from %s to %s", ts(mt), ts(got))
	}
	f, err := os.OpenFile(m.path(overlay.Disk), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	wrote := time.Now()
	if _, err := f.WriteAt([]byte("moves mtime"), 5000); err != nil {
		t.Fatal(err)
	}
	st := stat(img)
	if ts(st.Mtim).Before(wrote) || ts(st.Ctim).Before(wrote) {
		t.Fatalf("after a write at %s the image's mtime is %s, ctime %s", wrote, ts(st.Mtim), ts(st.Ctim))
	}
	// A stream's mtime is when its last line was added.
	io := stat("streams/io").Mtim
	if ts(io).Before(wrote) {
		t.Fatalf("streams/io: mtime %s, before the write it logged at %s", ts(io), wrote)
	}
}
