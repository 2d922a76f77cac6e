package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cloudletfs/cloudletfs/fetch"
)

// layerImages writes a VM that differs from the one in dir in a few
// chunks of each image, as a VM run from dir's overlay and changed by its
// user would.
func (e *env) layerImages(from, to string, seed uint64) {
	e.t.Helper()
	rng := rand.New(rand.NewPCG(seed, 9))
	d, m := e.read(from+"/disk.img"), e.read(from+"/memory.img")
	copy(d[4096*40:], randomBytes(rng, 4096*2))
	copy(d[4096*50:], d[4096*3:4096*4]) // a copy of a chunk only the parent carries
	copy(m[4096*7:], randomBytes(rng, 4096*3))
	clear(m[4096*20 : 4096*21])
	e.write(to+"/disk.img", d)
	e.write(to+"/memory.img", m)
	e.write(to+"/state", []byte("state of "+to))
	e.write(to+"/vm.json", e.read(from+"/vm.json"))
}

func (e *env) createLayer(dir, out, parent string, extra ...string) {
	e.t.Helper()
	e.ok(append([]string{"overlay", "create", "--base", "base", "--disk", e.path(dir + "/disk.img"),
		"--memory", e.path(dir + "/memory.img"), "--state", e.path(dir + "/state"), "--vm-config", e.path(dir + "/vm.json"),
		"--segment-size", "16KiB", "--parent", parent, "-o", e.path(out)}, extra...)...)
}

func (e *env) sameFiles(dir, want string) {
	e.t.Helper()
	for _, f := range []string{"disk.img", "memory.img", "state", "vm.json"} {
		if !bytes.Equal(e.read(dir+"/"+f), e.read(want+"/"+f)) {
			e.t.Fatalf("%s/%s differs from %s/%s", dir, f, want, f)
		}
	}
}

func TestLayeredOverlay(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	e.layerImages("app", "app2", 1)
	e.layerImages("app2", "app3", 2)
	e.createLayer("app2", "srv/app2.overlay", e.path("srv/app.overlay"))
	e.createLayer("app3", "srv/app3.overlay", e.path("srv/app2.overlay"))

	var info infoJSON
	if err := json.Unmarshal([]byte(e.ok("overlay", "info", "--json", e.path("srv/app2.overlay"))), &info); err != nil {
		t.Fatal(err)
	}
	if info.Version != 2 || info.Parent == nil || info.Parent.Location != "app.overlay" {
		t.Fatalf("the layer's info: version %d, parent %+v", info.Version, info.Parent)
	}
	// Only what differs from the parent travels: 2 new disk chunks and 3
	// new memory chunks; the copied chunk is taken from the parent.
	if d := info.Chunks["disk"]["data"] + info.Chunks["memory"]["data"]; d != 5 {
		t.Fatalf("the layer carries %d data chunks, want 5: %v", d, info.Chunks)
	}
	if info.Chunks["disk"]["parent-disk"] == 0 || info.Chunks["memory"]["parent-memory"] == 0 {
		t.Fatalf("parent references: %v", info.Chunks)
	}
	// A reader of version 1 alone stops at the version field.
	if b := e.read("srv/app.overlay"); b[8] != 1 {
		t.Fatalf("an overlay with no parent is version %d", b[8])
	}

	t.Run("extract", func(t *testing.T) {
		e := e.in(t)
		e.ok("overlay", "extract", e.path("srv/app2.overlay"), "-o", e.path("out2"))
		e.sameFiles("out2", "app2")
		e.ok("overlay", "extract", e.path("srv/app3.overlay"), "-o", e.path("out3"))
		e.sameFiles("out3", "app3")
		if ents, _ := filepath.Glob(e.path(".cloudletfs-parent-*")); len(ents) > 0 {
			t.Fatalf("extracting left %v", ents)
		}
	})

	t.Run("bad chains", func(t *testing.T) {
		e := e.in(t)
		e.write("bad/app2.overlay", e.read("srv/app2.overlay"))
		e.fails([]string{"parent overlay", "missing", "app.overlay"}, "overlay", "extract", e.path("bad/app2.overlay"), "-o", e.path("x"))
		// Another overlay where the parent should be.
		e.write("bad/app.overlay", e.read("srv/app3.overlay"))
		e.fails([]string{"not the"}, "overlay", "extract", e.path("bad/app2.overlay"), "-o", e.path("x"))
		e.nothingAt("x")
		// A parent on another base.
		e.write("other/disk.img", e.read("app/disk.img"))
		e.write("other/memory.img", e.read("app/memory.img"))
		e.write("other/state", []byte("other"))
		e.ok("base", "import", "--name", "other", "--disk", e.path("other/disk.img"), "--memory", e.path("other/memory.img"), "--state", e.path("other/state"))
		e.ok("overlay", "create", "--base", "other", "--disk", e.path("app/disk.img"), "--memory", e.path("app/memory.img"),
			"--state", e.path("app/state"), "-o", e.path("bad/other.overlay"))
		e.fails([]string{"built on base", "share one base"}, "overlay", "create", "--base", "base", "--disk", e.path("app2/disk.img"),
			"--memory", e.path("app2/memory.img"), "--state", e.path("app2/state"), "--parent", e.path("bad/other.overlay"), "-o", e.path("bad/x.overlay"))
		e.nothingAt("bad/x.overlay")
		e.fails([]string{"--parent-location needs --parent"}, "overlay", "create", "--base", "base", "--disk", e.path("app2/disk.img"),
			"--memory", e.path("app2/memory.img"), "--state", e.path("app2/state"), "--parent-location", "x", "-o", e.path("bad/x.overlay"))
	})

	requireFUSE(t)
	srv := e.start("serve", "--addr", "127.0.0.1:0", e.path("srv"))
	url := strings.Fields(srv.line(t))[3]
	mountLayer := func(t *testing.T, e *env, name string) parentStats {
		mnt := e.path("mnt-" + filepath.Base(e.state))
		os.MkdirAll(mnt, 0o755)
		t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
		e.mount(url+"/"+name, mnt)
		dir := strings.TrimSuffix(name, ".overlay")
		for img, f := range map[string]string{"disk/image": "disk.img", "memory/image": "memory.img"} {
			got, err := os.ReadFile(filepath.Join(mnt, img))
			if err != nil || !bytes.Equal(got, e.read(dir+"/"+f)) {
				t.Fatalf("%s of %s through the mount differs from the VM it was made of (%v)", img, name, err)
			}
		}
		b, err := os.ReadFile(filepath.Join(mnt, "stats"))
		if err != nil {
			t.Fatal(err)
		}
		var st struct {
			Parent *parentStats `json:"parent"`
		}
		if err := json.Unmarshal(b, &st); err != nil || st.Parent == nil {
			t.Fatalf("stats of a layered mount: %v: %s", err, b)
		}
		e.ok("umount", mnt)
		return *st.Parent
	}
	t.Run("mount with the parent from its URL", func(t *testing.T) {
		e := e.in(t)
		e.state = e.path("state-url")
		e.importBase("base", "base")
		p := mountLayer(t, e, "app3.overlay")
		if p.From != "url" || !strings.HasSuffix(p.URL, "/app2.overlay") || p.Stats.BytesFetched == 0 || p.Stats.Parent == nil || p.Stats.Parent.From != "url" {
			t.Fatalf("stats say of the parents: %+v", p)
		}
	})
	t.Run("mount with the parent from the cache", func(t *testing.T) {
		e := e.in(t)
		e.state = e.path("state-cache")
		e.importBase("base", "base")
		mnt := e.path("mnt-parent")
		os.MkdirAll(mnt, 0o755)
		m := e.mount(url+"/app.overlay", mnt)
		if _, err := os.ReadFile(filepath.Join(mnt, "memory/image")); err != nil {
			t.Fatal(err)
		}
		if _, err := os.ReadFile(filepath.Join(mnt, "disk/image")); err != nil {
			t.Fatal(err)
		}
		e.ok("umount", mnt)
		m.wait(t)
		p := mountLayer(t, e, "app2.overlay")
		if p.From != "cache" || p.Stats.BytesFetched != 0 {
			t.Fatalf("stats say of the parent: %+v", p)
		}
	})
}

type parentStats = fetch.ParentStats
