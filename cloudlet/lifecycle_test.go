package cloudlet_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/cloudletfs/cloudletfs/cloudlet"
)

// sleeper is a worker that stays alive until it is signalled and never
// reports: the VM it was given stays in its first state. The VM's dir is
// appended to the command, and so is $1.
var sleeper = []string{"sh", "-c", "exec sleep 600", "sh"}

// runnable sets up a runnable base in stateDir and serves overlays of it,
// one for each seed, at /vm-SEED.overlay.
func runnable(t *testing.T, stateDir string, seeds ...uint64) (urls []string) {
	t.Helper()
	b := importBase(t, stateDir, "base", baseFiles(t, t.TempDir(), 42, true))
	files := map[string][]byte{}
	for _, seed := range seeds {
		files[fmt.Sprintf("/vm-%d.overlay", seed)] = buildOverlay(t, stateDir, b, seed)
	}
	srv := serveOverlays(t, files)
	for _, seed := range seeds {
		urls = append(urls, fmt.Sprintf("%s/vm-%d.overlay", srv.URL, seed))
	}
	return urls
}

func counter(fams map[string]*dto.MetricFamily, name, state string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) == 0 && state == "" || len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == state {
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

func TestDeadWorkerIsReportedFailed(t *testing.T) {
	dir := t.TempDir()
	u := start(t, cloudlet.Options{StateDir: dir, Worker: []string{"/bin/true"}})
	url := runnable(t, dir, 1)[0]
	// Credentials in the URL go as basic auth, and are never shown.
	withPassword := strings.Replace(url, "http://", "http://alice:pw-5e1d@", 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	v, err := u.client.Create(ctx, cloudlet.Request{Overlay: withPassword})
	if err != nil {
		t.Fatalf("admitting a VM: %v", err)
	}
	if v.ID == "" || v.Base != "base" || v.MemoryBytes != memSize || v.State.Final() {
		t.Fatalf("admitted %+v: want an ID, base \"base\", %d bytes of RAM and a state not final", v, memSize)
	}
	if strings.Contains(v.Overlay, "pw-5e1d") || !strings.Contains(v.Overlay, "/vm-1.overlay") {
		t.Fatalf("the VM shows its overlay as %q: want it named, without its password", v.Overlay)
	}
	ended := follow(t, u.client, v.ID, 30*time.Second)
	if ended.State != cloudlet.Failed || !strings.Contains(ended.Reason, "its worker process died") {
		t.Fatalf("VM whose worker exited at once ended %s: %q; want failed, saying its worker died", ended.State, ended.Reason)
	}
	if n := len(ended.Timeline); n < 2 || ended.Timeline[0].Step != cloudlet.StepRequested || ended.Timeline[n-1].Step != cloudlet.StepFailed {
		t.Fatalf("timeline %+v: want requested first and failed last", ended.Timeline)
	}
	if got, err := u.client.Get(ctx, v.ID); err != nil || got.State != cloudlet.Failed {
		t.Fatalf("GET of the failed VM: %+v, %v", got, err)
	}
	fams := scrape(t, u)
	for s, n := range vmsByState(t, fams) {
		if want := map[bool]float64{true: 1}[s == cloudlet.Failed]; n != want {
			t.Errorf("cloudletfs_vms{state=%q} = %v, want %v", s, n, want)
		}
	}
	if n := counter(fams, "cloudletfs_vm_requests_total", ""); n != 1 {
		t.Errorf("cloudletfs_vm_requests_total = %v, want 1", n)
	}
	if n := counter(fams, "cloudletfs_vm_ended_total", "failed"); n != 1 {
		t.Errorf("cloudletfs_vm_ended_total{state=\"failed\"} = %v, want 1", n)
	}

	// The registry keeps the VM's end across a restart of the daemon.
	u.close(t)
	u = start(t, cloudlet.Options{StateDir: dir, Worker: []string{"/bin/true"}})
	again, err := u.client.Get(ctx, v.ID)
	if err != nil {
		t.Fatalf("the VM after a restart: %v", err)
	}
	if again.State != cloudlet.Failed || again.Reason != ended.Reason {
		t.Fatalf("after a restart the VM is %s %q, want failed %q", again.State, again.Reason, ended.Reason)
	}
	// An ended VM is forgotten on request, for good.
	if status, e, _ := u.call(t, http.MethodDelete, "/v1/vms/"+v.ID+"?forget=1", "", ""); status != http.StatusNoContent {
		t.Fatalf("DELETE ?forget=1 of an ended VM: %d (%s), want 204", status, e.Error)
	}
	_, err = u.client.Get(ctx, v.ID)
	apiError(t, "a forgotten VM", err, 404, "")
	u.close(t)
	u = start(t, cloudlet.Options{StateDir: dir, Worker: []string{"/bin/true"}})
	_, err = u.client.Get(ctx, v.ID)
	apiError(t, "a forgotten VM after a restart", err, 404, "")
}

// workerPid waits for the pid-writing worker of the VM to record its PID,
// and returns it. The worker writes it once it runs, which may be after
// the VM was admitted.
func workerPid(t *testing.T, pids, id string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(pids)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			pid, dir, _ := strings.Cut(line, " ")
			if strings.Contains(dir, id) {
				n, err := strconv.Atoi(pid)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no worker of VM %s recorded in %s within 10 s:\n%s", id, pids, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitGone waits until process pid has exited (and is not a zombie).
func waitGone(t *testing.T, pid int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if errors.Is(err, os.ErrNotExist) {
			return
		}
		if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d still runs %v after SIGKILL", pid, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestWorkerThatDiedWhileTheDaemonWasDown(t *testing.T) {
	dir := t.TempDir()
	pids := filepath.Join(t.TempDir(), "pids")
	worker := []string{"sh", "-c", `echo "$$ $1" >> "$0"; exec sleep 600`, pids}
	u := start(t, cloudlet.Options{StateDir: dir, Worker: worker})
	url := runnable(t, dir, 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	v, err := u.client.Create(ctx, cloudlet.Request{Overlay: url})
	if err != nil {
		t.Fatalf("admitting a VM: %v", err)
	}
	pid := workerPid(t, pids, v.ID)
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })

	// A daemon that stops leaves the worker running, and the next one
	// follows it again.
	u.close(t)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("the worker did not outlive its daemon: %v", err)
	}
	u = start(t, cloudlet.Options{StateDir: dir, Worker: worker})
	got, err := u.client.Get(ctx, v.ID)
	if err != nil || got.State != cloudlet.FetchingMetadata {
		t.Fatalf("a live VM after a restart: %s %q (%v), want %s", got.State, got.Reason, err, cloudlet.FetchingMetadata)
	}

	// The worker dies while no daemon runs.
	u.close(t)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid, 10*time.Second)
	u = start(t, cloudlet.Options{StateDir: dir, Worker: worker})
	ended := follow(t, u.client, v.ID, 30*time.Second)
	if ended.State != cloudlet.Failed || !strings.Contains(ended.Reason, "died while the cloudlet daemon was not running") {
		t.Fatalf("a VM whose worker died with the daemon down: %s %q; want failed, saying so", ended.State, ended.Reason)
	}
	u.close(t)
	u = start(t, cloudlet.Options{StateDir: dir, Worker: worker})
	if again, err := u.client.Get(ctx, v.ID); err != nil || again.State != cloudlet.Failed || again.Reason != ended.Reason {
		t.Fatalf("after one more restart: %s %q (%v), want failed %q", again.State, again.Reason, err, ended.Reason)
	}
}

// stop stops a VM through the API and checks that it ended as asked.
func stop(t *testing.T, u *cloudletUnderTest, id string) cloudlet.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	v, err := u.client.Stop(ctx, id)
	if err != nil {
		t.Fatalf("stopping VM %s: %v", id, err)
	}
	if !v.State.Final() {
		t.Fatalf("VM %s after its stop returned is %s", id, v.State)
	}
	if _, ok := v.At("stopping"); !ok {
		t.Fatalf("VM %s stopped without a stopping step: %+v", id, v.Timeline)
	}
	t.Logf("VM %s stopped in %v: %s (%s)", id, time.Since(start).Round(time.Millisecond), v.State, v.Reason)
	return v
}

func TestAdmissionLimits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("max VMs", func(t *testing.T) {
		dir := t.TempDir()
		u := start(t, cloudlet.Options{StateDir: dir, Worker: sleeper, MaxVMs: 1})
		urls := runnable(t, dir, 1, 2)
		a, err := u.client.Create(ctx, cloudlet.Request{Overlay: urls[0]})
		if err != nil {
			t.Fatalf("the first VM: %v", err)
		}
		if n := vmsByState(t, scrape(t, u))[cloudlet.FetchingMetadata]; n != 1 {
			t.Errorf("cloudletfs_vms{state=\"fetching-metadata\"} = %v with one VM admitted, want 1", n)
		}
		_, err = u.client.Create(ctx, cloudlet.Request{Overlay: urls[0]})
		if ae := apiError(t, "the same overlay again", err, 409, "overlay"); !strings.Contains(ae.Msg, a.ID) {
			t.Errorf("409 message %q does not name VM %s", ae.Msg, a.ID)
		}
		_, err = u.client.Create(ctx, cloudlet.Request{Overlay: urls[1]})
		if ae := apiError(t, "a second VM over --max-vms 1", err, 429, ""); !strings.Contains(ae.Msg, "--max-vms") {
			t.Errorf("429 message %q does not name the limit", ae.Msg)
		}

		// The event stream follows the VM from live to its end.
		followed := make(chan cloudlet.VM, 1)
		seen := make(chan struct{})
		go func() {
			var once bool
			v, _ := u.client.Follow(ctx, a.ID, func(v cloudlet.VM) bool {
				if !once {
					once = true
					close(seen)
				}
				return true
			})
			followed <- v
		}()
		select {
		case <-seen:
		case <-ctx.Done():
			t.Fatal("no event of the live VM")
		}
		stopped := stop(t, u, a.ID)
		select {
		case v := <-followed:
			if v.State != stopped.State {
				t.Errorf("the event stream ended with the VM %s, the stop returned it %s", v.State, stopped.State)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the event stream did not end within 30 s of the VM's stop")
		}

		// A VM that ended takes no room.
		b, err := u.client.Create(ctx, cloudlet.Request{Overlay: urls[1]})
		if err != nil {
			t.Fatalf("a VM once the first stopped: %v", err)
		}
		stop(t, u, b.ID)
	})

	t.Run("max memory", func(t *testing.T) {
		dir := t.TempDir()
		u := start(t, cloudlet.Options{StateDir: dir, Worker: sleeper, MaxMemory: memSize + memSize/2})
		urls := runnable(t, dir, 1, 2)
		a, err := u.client.Create(ctx, cloudlet.Request{Overlay: urls[0]})
		if err != nil {
			t.Fatalf("the first VM: %v", err)
		}
		_, err = u.client.Create(ctx, cloudlet.Request{Overlay: urls[1]})
		if ae := apiError(t, "a second VM over --max-memory", err, 507, ""); !strings.Contains(ae.Msg, "--max-memory") || !strings.Contains(ae.Msg, "128 KiB") {
			t.Errorf("507 message %q: want the limit named and the 128 KiB left", ae.Msg)
		}
		stop(t, u, a.ID)
		b, err := u.client.Create(ctx, cloudlet.Request{Overlay: urls[1]})
		if err != nil {
			t.Fatalf("a VM once the first stopped: %v", err)
		}
		stop(t, u, b.ID)
	})

	t.Run("memory over the limit alone", func(t *testing.T) {
		dir := t.TempDir()
		u := start(t, cloudlet.Options{StateDir: dir, Worker: sleeper, MaxMemory: memSize - 1})
		urls := runnable(t, dir, 1)
		_, err := u.client.Create(ctx, cloudlet.Request{Overlay: urls[0]})
		apiError(t, "a VM larger than --max-memory", err, 507, "")
		if vms := u.svc.List(); len(vms) != 0 {
			t.Fatalf("a refused VM is listed: %+v", vms)
		}
	})
}
