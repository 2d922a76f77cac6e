package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// faceGuest builds (or reuses) the FACE application guest from Debian
// packages, under build/face.
func faceGuest(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "build", "face")
	start := time.Now()
	out, err := exec.Command(filepath.Join(root, "tools", "face", "build.sh"), dir).CombinedOutput()
	if err != nil {
		t.Fatalf("building the FACE guest: %v\n%s", err, out)
	}
	t.Logf("FACE guest built or reused in %s", time.Since(start).Round(time.Second))
	return dir
}

// faceAnswer is the face service's answer to a POSTed image.
type faceAnswer struct {
	Count  int      `json:"count"`
	Faces  [][4]int `json:"faces"`
	Width  int      `json:"width"`
	Height int      `json:"height"`
}

// checkFaceAnswer checks the first response of a launch whose probe posted
// the astronaut photo: one face, its box where her face is.
func checkFaceAnswer(t *testing.T, launched string) {
	t.Helper()
	m := regexp.MustCompile(`first response: (\{.*\})`).FindStringSubmatch(launched)
	if m == nil {
		t.Fatalf("no first response from the face service:\n%s", launched)
	}
	var a faceAnswer
	if err := json.Unmarshal([]byte(m[1]), &a); err != nil {
		t.Fatalf("the face service answered %q: %v", m[1], err)
	}
	if a.Width != 512 || a.Height != 512 || a.Count != 1 || len(a.Faces) != 1 {
		t.Fatalf("want one face in the 512x512 photo, got %+v", a)
	}
	// The astronaut's face is in the upper middle of the photo.
	x, y, w, h := a.Faces[0][0], a.Faces[0][1], a.Faces[0][2], a.Faces[0][3]
	cx, cy := x+w/2, y+h/2
	if cx < 150 || cx > 330 || cy < 50 || cy > 220 || w < 60 || w > 220 || h < 60 || h > 220 {
		t.Fatalf("the face box %v is not where the astronaut's face is", a.Faces[0])
	}
}

// The FACE application VM end to end under TCG: a Debian guest as the base
// (1 GiB of RAM, 3 GiB disk), python3-opencv installed from .debs the host
// serves during capture, and a face detection answered through launch
// --probe from a mount of the overlay served over HTTP.
func TestFaceEndToEnd(t *testing.T) {
	requireFUSE(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64 (make deps)")
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("needs curl (make deps)")
	}
	g := faceGuest(t)
	e := newEnv(t)
	bin := cloudletfsBinary(t)
	mustRun := func(args ...string) string {
		t.Helper()
		start := time.Now()
		cmd := exec.Command(bin, append([]string{"--state-dir", e.state}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("cloudletfs %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("cloudletfs %s %s: %s", args[0], args[1], time.Since(start).Round(time.Second))
		return string(out)
	}

	mustRun("base", "create", "--name", "face", "--disk", filepath.Join(g, "disk.img"), "--memory-size", "1GiB",
		"--kernel", filepath.Join(g, "vmlinuz"), "--initrd", filepath.Join(g, "initrd.img"),
		"--append", readText(t, filepath.Join(g, "append")),
		"--ready", "^face-base-ready", "--ready-timeout", "15m", "--accel", "tcg")

	// The guest fetches the .debs and the service from the host.
	debs := e.start("serve", "--addr", "127.0.0.1:0", filepath.Join(g, "srv"))
	debsURL := strings.Fields(debs.line(t))[3] // "serving DIR on http://ADDR (...)"
	script := strings.ReplaceAll(readText(t, filepath.Join(g, "app.script")), "@PORT@",
		debsURL[strings.LastIndex(debsURL, ":")+1:])
	e.write("app.script", []byte(script+"\n"))
	srvDir := e.path("srv")
	if err := os.MkdirAll(srvDir, 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun("overlay", "capture", "--base", "face", "--script", e.path("app.script"), "--ready", "^face-app-ready",
		"--ready-timeout", "45m", "--codec", "zstd", "--accel", "tcg", "-o", filepath.Join(srvDir, "face.overlay"))
	info := mustRun("overlay", "info", filepath.Join(srvDir, "face.overlay"))
	t.Logf("the FACE overlay:\n%s", info)

	srv := e.start("serve", "--addr", "127.0.0.1:0", srvDir)
	url := strings.Fields(srv.line(t))[3] + "/face.overlay"
	probe := "curl -sf -m 300 --data-binary @" + filepath.Join(g, "face.png") + " http://127.0.0.1:$CLOUDLETFS_PORT/detect"
	out := mustRun("launch", "--accel", "tcg", "--probe", probe, "--probe-timeout", "20m", "--exit-after-probe", url)
	for _, want := range []string{"metadata arrived", "QEMU running", "overlay complete"} {
		if !strings.Contains(out, want) {
			t.Fatalf("timeline lacks %q:\n%s", want, out)
		}
	}
	checkFaceAnswer(t, out)
	t.Logf("launch:\n%s", out)
}

// readText returns the file's text without surrounding white space.
func readText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
