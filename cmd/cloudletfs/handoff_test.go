package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/launch"
)

// startLink starts `cloudletfs link` to target and returns its address.
func startLink(t *testing.T, e *env, target string, args ...string) string {
	t.Helper()
	p := e.start(append([]string{"link", "--listen", "127.0.0.1:0"}, append(args, target)...)...)
	l := p.line(t)
	m := regexp.MustCompile(`^link listening on (\S+) to `).FindStringSubmatch(l)
	if m == nil {
		t.Fatalf("link printed %q; stderr:\n%s", l, p.errText())
	}
	return m[1]
}

// appClient keeps asking the test guest's application, at the address
// it is given, and keeps every answer.
type appClient struct {
	mu      sync.Mutex
	target  string
	answers []appAnswerAt
	changed chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

type appAnswerAt struct {
	where       string
	count, prev int
}

func newAppClient(target string) *appClient {
	c := &appClient{target: target, changed: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	return c
}

func (c *appClient) run() {
	defer close(c.done)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for {
		select {
		case <-c.stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		c.mu.Lock()
		target := c.target
		c.mu.Unlock()
		resp, err := hc.Get("http://" + target + "/cgi-bin/app")
		if err != nil {
			continue
		}
		b := make([]byte, 512)
		n, _ := resp.Body.Read(b)
		resp.Body.Close()
		m := appAnswer.FindStringSubmatch(strings.TrimSpace(string(b[:n])))
		if m == nil {
			continue
		}
		a := appAnswerAt{where: target}
		a.count, _ = strconv.Atoi(m[1])
		a.prev, _ = strconv.Atoi(m[2])
		c.mu.Lock()
		c.answers = append(c.answers, a)
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	}
}

// from counts the answers from where so far.
func (c *appClient) from(where string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, a := range c.answers {
		if a.where == where {
			n++
		}
	}
	return n
}

// waitFrom waits until n answers came from where.
func (c *appClient) waitFrom(t *testing.T, where string, n int) {
	t.Helper()
	deadline := time.After(2 * time.Minute)
	for {
		c.mu.Lock()
		got := 0
		for _, a := range c.answers {
			if a.where == where {
				got++
			}
		}
		ch := c.changed
		c.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("%d answers from %s in 2 minutes, want %d", got, where, n)
		}
	}
}

func (c *appClient) moveTo(target string) {
	c.mu.Lock()
	c.target = target
	c.mu.Unlock()
}

func (c *appClient) end() []appAnswerAt {
	close(c.stop)
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]appAnswerAt(nil), c.answers...)
}

// unbroken checks that the counter in the guest's memory went on and
// never back, and that each request found on the disk what the one before
// it wrote there.
func unbroken(t *testing.T, as []appAnswerAt) {
	t.Helper()
	for i, a := range as {
		if a.count > 1 && a.prev != a.count-1 {
			t.Fatalf("answer %d from %s: request %d read %d from the disk, not the %d the request before wrote", i, a.where, a.count, a.prev, a.count-1)
		}
		if i > 0 && a.count <= as[i-1].count {
			t.Fatalf("answer %d from %s went back: count %d after %d from %s", i, a.where, a.count, as[i-1].count, as[i-1].where)
		}
	}
}

// testHandoff moves the test guest's VM, while a client keeps asking its
// application, between two cloudlet services on this machine, each with
// its own state dir, port and copy of the base, over emulated links; then
// hands another off to a third cloudlet killed in the middle.
func testHandoff(t *testing.T, e *env, url string) {
	bin := cloudletfsBinary(t)
	run := func(args ...string) (string, error) {
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	bases, _ := filepath.Glob(filepath.Join(e.state, "base-guest-*"))
	if len(bases) != 1 {
		t.Fatalf("base dirs of the guest: %v", bases)
	}
	cloudletEnv := func(name string) *env {
		c := e.in(t)
		c.state = e.path("state-" + name)
		b := bases[0]
		if out, err := run("--state-dir", c.state, "base", "import", "--name", "guest", "--disk", filepath.Join(b, "disk.img"),
			"--memory", filepath.Join(b, "memory.img"), "--state", filepath.Join(b, "state"), "--vm-config", filepath.Join(b, "vm.json")); err != nil {
			t.Fatalf("base import: %v\n%s", err, out)
		}
		t.Cleanup(func() {
			stopWorkers(t, c.state)
			if t.Failed() {
				logs, _ := filepath.Glob(filepath.Join(c.state, "cloudlet", "vms", "*", "*.log"))
				for _, l := range logs {
					b, _ := os.ReadFile(l)
					if len(b) > 3000 {
						b = b[len(b)-3000:]
					}
					t.Logf("%s ends:\n%s", l, b)
				}
			}
		})
		return c
	}
	eA, eB := cloudletEnv("a"), cloudletEnv("b")
	portA, err := launch.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	// The link between the cloudlets, each way: B fetches the layer from
	// A through one, A sends ahead and asks B through the other.
	toA := startLink(t, e, fmt.Sprintf("127.0.0.1:%d", portA), "--rate", "25mbit", "--rtt", "20ms")
	a := startCloudlet(t, eA, "--listen", fmt.Sprintf("127.0.0.1:%d", portA), "--advertise", "http://"+toA)
	e.write("b.token", []byte("b-token\n"))
	b := startCloudlet(t, eB, "--token-file", e.path("b.token"))
	toB := startLink(t, e, strings.TrimPrefix(b.url, "http://"), "--rate", "25mbit", "--rtt", "20ms")
	clA, _ := cloudlet.NewClient(a.url, "")
	clB, _ := cloudlet.NewClient(b.url, "b-token")
	ctx := context.Background()

	out, err := run("synthesize", "--cloudlet", a.url, "--probe", "/cgi-bin/app", url)
	if err != nil {
		t.Fatalf("synthesize: %v\n%s", err, out)
	}
	vm := parseSynth(t, out)
	app := newAppClient(vm.app)
	app.waitFrom(t, vm.app, 3)

	// The client moves to B once B runs the VM: it learns where from B.
	moved := make(chan string, 1)
	go func() {
		for range 1200 {
			vs, _ := clB.List(ctx)
			for _, v := range vs {
				if v.Handoff != nil && v.Handoff.From != "" && len(v.Ports) > 0 && (v.State == cloudlet.Running || v.State == cloudlet.FirstResponse || v.State == cloudlet.Complete) {
					app.moveTo(v.Ports[0].Host)
					moved <- v.ID
					return
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		moved <- ""
	}()
	out, err = run("handoff", "--cloudlet", a.url, vm.id, "--to", "http://"+toB, "--to-token-file", e.path("b.token"))
	if err != nil {
		t.Fatalf("handoff: %v\n%s", err, out)
	}
	t.Logf("handoff:\n%s", out)
	for _, want := range []string{"handing off to", "precopy began", "QEMU stopped the VM", "layer", "the destination runs the VM: downtime", "has all of the layer", "now runs on"} {
		if !strings.Contains(out, want) {
			t.Fatalf("the handoff's timeline lacks %q:\n%s", want, out)
		}
	}
	m := regexp.MustCompile(`the application answers at (\S+) \(guest port \d+ of VM (\w+)\)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("handoff printed no address of the application:\n%s", out)
	}
	bID := <-moved
	if bID != m[2] {
		t.Fatalf("B runs VM %q, the handoff says %s", bID, m[2])
	}
	app.waitFrom(t, m[1], 3)
	as := app.end()
	unbroken(t, as)
	t.Logf("answers: first %+v, last %+v, %d in all", as[0], as[len(as)-1], len(as))

	// Nothing of the VM is left on A: not its record, QEMU, mount, port.
	// A forgets it just after its last report.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, err := clA.Get(ctx, vm.id)
		if err != nil && strings.Contains(err.Error(), "404") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A still knows the VM 10 s after the handoff: %v", err)
		}
	}
	dir := filepath.Join(eA.state, "cloudlet", "vms", vm.id)
	if len(vmProcesses(eA.state, vm.id)) > 0 || mounted(filepath.Join(dir, "mnt")) {
		t.Fatal("A's QEMU or mount outlived the handoff")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("A kept the VM's directory: %v", err)
	}
	if c, err := net.DialTimeout("tcp", vm.app, time.Second); err == nil {
		c.Close()
		t.Fatalf("A's port %s still answers", vm.app)
	}
	// B has all of the VM once its parent, the VM's overlay, has come
	// from the overlay's URL too.
	fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	bv, err := clB.Follow(fctx, bID, func(v cloudlet.VM) bool { return v.Handoff == nil || v.Handoff.Phase != cloudlet.HandoffComplete })
	cancel()
	if err != nil || bv.Stats == nil || bv.Stats.Parent == nil || bv.Stats.Parent.From != "url" || bv.Handoff == nil || bv.Handoff.Phase != cloudlet.HandoffComplete {
		t.Fatalf("B's VM: %v %+v", err, bv.Handoff)
	}

	// A destination that dies in the middle of the rounds: the VM runs
	// on at A, and says why.
	eC := cloudletEnv("c")
	c := startCloudlet(t, eC)
	slow := startLink(t, e, strings.TrimPrefix(c.url, "http://"), "--rate", "256kbit", "--rtt", "20ms")
	out, err = run("synthesize", "--cloudlet", a.url, "--probe", "/cgi-bin/app", url)
	if err != nil {
		t.Fatalf("synthesize: %v\n%s", err, out)
	}
	vm2 := parseSynth(t, out)
	app = newAppClient(vm2.app)
	app.waitFrom(t, vm2.app, 2)
	if _, err := clA.Handoff(ctx, vm2.id, cloudlet.HandoffRequest{To: "http://" + slow}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		segs, _ := filepath.Glob(filepath.Join(eC.state, "cloudlet", "handoffs", "*", "[0-9a-f]*"))
		if len(segs) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no segment reached C within a minute")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.p.cmd.Process.Kill()
	fctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
	v, err := clA.Follow(fctx, vm2.id, func(v cloudlet.VM) bool { return v.Handoff == nil || v.Handoff.Phase != cloudlet.HandoffFailed })
	cancel()
	if v.Handoff == nil || v.Handoff.Phase != cloudlet.HandoffFailed || !strings.Contains(v.Handoff.Reason, "runs on here") {
		t.Fatalf("the handoff to a dead cloudlet: %v %+v", err, v.Handoff)
	}
	if v.State != cloudlet.Running && v.State != cloudlet.FirstResponse && v.State != cloudlet.Complete || len(vmProcesses(eA.state, vm2.id)) != 1 {
		t.Fatalf("after the failed handoff A's VM is %s", v.State)
	}
	app.waitFrom(t, vm2.app, app.from(vm2.app)+2)
	t.Logf("the failed handoff: %s", v.Handoff.Reason)

	// A destination that refuses the VM once QEMU has stopped it here:
	// it has no room for it. The VM runs again here.
	eD := cloudletEnv("d")
	dd := startCloudlet(t, eD, "--max-memory", "1MiB")
	toD := startLink(t, e, strings.TrimPrefix(dd.url, "http://"), "--rate", "25mbit", "--rtt", "20ms")
	out, err = run("handoff", "--cloudlet", a.url, vm2.id, "--to", "http://"+toD)
	if err == nil || !strings.Contains(out, "QEMU stopped the VM") || !strings.Contains(out, "507") || !strings.Contains(out, "runs on at") {
		t.Fatalf("a handoff to a cloudlet without room: %v\n%s", err, out)
	}
	app.waitFrom(t, vm2.app, app.from(vm2.app)+2)
	unbroken(t, app.end())
	if v, err := clA.Get(ctx, vm2.id); err != nil || v.State.Final() || len(vmProcesses(eA.state, vm2.id)) != 1 {
		t.Fatalf("after the refused handoff A's VM is %s (%v)", v.State, err)
	}
}
