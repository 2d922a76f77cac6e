package main

import (
	"bytes"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// runAll runs cloudletfs in-process and returns all it printed and its
// error.
func (e *env) runAll(args ...string) (stdout, stderr string, err error) {
	var o, s bytes.Buffer
	app := newApp(&o, &s)
	err = app.Run(interspersed(app, append([]string{"cloudletfs", "--state-dir", e.state}, args...)))
	return o.String(), s.String(), err
}

// TestUsageErrorsAreOneLine gives every kind of bad usage to the commands
// and wants one line back that says what is wrong and where to read more,
// with no help printed.
func TestUsageErrorsAreOneLine(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("app.overlay")
	e.write("t.trace", []byte("0 disk 1\n"))
	ovl, tr := e.path("app.overlay"), e.path("t.trace")
	replay := func(extra ...string) []string {
		return append([]string{"replay", "--overlay", ovl, "--trace", tr}, extra...)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{replay("--rtt", "-20ms"), `replay: --rtt -20ms: want a duration of zero or more`},
		{replay("--rtt", "abc"), `replay: --rtt "abc": want a duration`},
		{replay("--startup", "-1s"), `--startup -1s`},
		{replay("--bogus"), `replay: unknown flag --bogus`},
		{replay("--rate"), `replay: --rate needs a value`},
		{replay("extra"), `replay: unexpected argument "extra"`},
		{[]string{"replay", "--trace", tr}, `replay: --overlay is required`},
		{[]string{"status", "--interval", "0", e.dir}, `status: --interval 0s: want a duration above zero`},
		{[]string{"status", "--interval", "-1s", e.dir}, `--interval -1s`},
		{[]string{"status", e.dir, e.dir}, `status: unexpected argument`},
		{[]string{"trace", "merge", "--min-runs", "0", tr, "-o", e.path("m.trace")}, `trace merge: --min-runs 0: want a whole number above zero`},
		{[]string{"trace", "merge", "--min-runs", "-2", tr, "-o", e.path("m.trace")}, `--min-runs -2`},
		{[]string{"trace", "merge", "-o", e.path("m.trace")}, `trace merge: want one TRACE or more`},
		{[]string{"trace", "show", "--chunk-size", "3", tr}, `trace show: --chunk-size 3: want a power of two`},
		{[]string{"trace", "show", "--chunk-size", "0", tr}, `--chunk-size 0`},
		{[]string{"base", "import", "--name", "x", "--disk", e.path("base/disk.img"), "--memory", e.path("base/memory.img"),
			"--state", e.path("base/state"), "--chunk-size", "3"}, `--chunk-size 3: want a power of two`},
		{[]string{"base", "list", "extra"}, `base list: unexpected argument "extra"; it takes no arguments`},
		{[]string{"base", "rm"}, `base rm: want one base ID or NAME`},
		{[]string{"overlay", "info", ovl, ovl}, `overlay info: unexpected argument`},
		{[]string{"overlay", "verify", "-j", "0", ovl}, `overlay verify: --jobs 0`},
		{[]string{"overlay", "verify", "-j", "x", ovl}, `overlay verify: -j "x": want a whole number`},
		{[]string{"overlay", "extract", ovl}, `overlay extract: --output is required`},
		{[]string{"overlay", "create", "--base", "base"}, `overlay create: --disk is required`},
		{[]string{"overlay", "reorder", ovl, "-o", e.path("r.overlay")}, `overlay reorder: --trace is required`},
		{[]string{"serve", "--rtt", "-5ms", e.dir}, `serve: --rtt -5ms`},
		{[]string{"mount", "--fetch-timeout", "0", ovl, e.dir}, `mount: --fetch-timeout 0s`},
		{[]string{"mount", ovl}, `mount: want OVERLAY and MOUNTPOINT`},
		{[]string{"launch", "--probe-timeout", "-1m", ovl}, `launch: --probe-timeout -1m0s`},
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "1MiB", "--smp", "0"}, `base create: --smp 0`},
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "1MiB", "--ready-timeout", "0"}, `base create: --ready-timeout 0s`},
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "1MiB", "--guest-port", "70000"}, `--guest-port 70000`},
		{[]string{"overlay", "capture", "--base", "base", "--ready-timeout", "-1s", "-o", e.path("c.overlay")}, `overlay capture: --ready-timeout -1s`},
		{[]string{"cache", "rm"}, `cache rm: want one OVERLAY-ID`},
		{[]string{"cache", "ls", "x"}, `cache ls: unexpected argument "x"`},
		{[]string{"--bogus", "base", "list"}, `unknown flag --bogus`},
		{[]string{"--state-dir"}, `--state-dir needs a value`},
		{[]string{"mount", "--policy", "bogus", ovl, e.dir}, `mount: --policy "bogus": want stream+demand or demand-only`},
		{[]string{"launch", "--policy", "bogus", ovl}, `launch: --policy "bogus"`},
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "1"}, `base create: --memory-size "1": want whole MiB`},
		{[]string{"serve", "--rate", "abc", e.dir}, `serve: --rate "abc": want a link rate`},
		{replay("--rate", "abc"), `replay: --rate "abc"`},
		{replay("--policy", "bogus"), `replay: --policy`},
		{[]string{"overlay", "create", "--base", "base", "--disk", ovl, "--memory", ovl, "--state", ovl, "-o", e.path("x.overlay"), "--codec", "gz"}, `overlay create: --codec "gz"`},
		{[]string{"launch", ovl, "extra"}, `launch: unexpected argument "extra"; extra QEMU arguments go after --`},
		// What follows -- is QEMU's, not counted: the next check speaks.
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "1", "--", "-device", "x"}, `base create: --memory-size "1"`},
		{[]string{"launch", "--policy", "bogus", ovl, "--", "-device", "x"}, `launch: --policy "bogus"`},
		{[]string{"base", "create", "--name", "n", "--disk", ovl, "--memory-size", "16MiB", "extra"}, `base create: unexpected argument "extra"`},
		{[]string{"--log-level"}, `--log-level needs a value`},
	} {
		stdout, stderr, err := e.runAll(c.args...)
		name := strings.Join(c.args, " ")
		if err == nil {
			t.Errorf("%s: succeeded", name)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, c.want) || !strings.Contains(msg, "--help") || strings.Contains(msg, "\n") {
			t.Errorf("%s: error %q, want one line with %q and where to read more", name, msg, c.want)
		}
		if stdout != "" || stderr != "" {
			t.Errorf("%s: printed more than the error:\n%s%s", name, stdout, stderr)
		}
	}
	// Zero is a round trip time, and a value given after the positional
	// arguments is still checked.
	if _, _, err := e.runAll(replay("--rtt", "0")...); err != nil {
		t.Errorf("replay --rtt 0: %v", err)
	}
	if _, _, err := e.runAll("status", e.dir, "--interval", "0"); err == nil || !strings.Contains(err.Error(), "--interval 0s") {
		t.Errorf("status DIR --interval 0: %v", err)
	}
	// A "--" before the positional arguments ends the flags, as in other
	// tools: the arguments after it are the command's own.
	if out, _, err := e.runAll("overlay", "info", "--", ovl); err != nil || !strings.Contains(out, "segments") {
		t.Errorf("overlay info -- OVERLAY: %v\n%s", err, out)
	}
}

// TestHelpAndUnknownCommand runs the built program as a user does: help
// is printed on demand with exit status 0, and an unknown command is one
// line on stderr with a non-zero status.
func TestHelpAndUnknownCommand(t *testing.T) {
	bin := cloudletfsBinary(t)
	run := func(args ...string) (string, string, int) {
		cmd := exec.Command(bin, append([]string{"--state-dir", t.TempDir()}, args...)...)
		var o, s bytes.Buffer
		cmd.Stdout, cmd.Stderr = &o, &s
		err := cmd.Run()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		return o.String(), s.String(), cmd.ProcessState.ExitCode()
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"help"}, "COMMANDS:"},
		{[]string{"--help"}, "COMMANDS:"},
		{nil, "COMMANDS:"},
		{[]string{"help", "overlay"}, "cloudletfs overlay - create, capture"},
		{[]string{"help", "overlay", "create"}, "cloudletfs overlay create - build an overlay"},
		{[]string{"overlay", "help", "extract"}, "cloudletfs overlay extract - rebuild"},
		// What follows the command's name is not run.
		{[]string{"help", "launch", "extra"}, "cloudletfs launch - mount an overlay"},
		{[]string{"help", "overlay", "info", "nosuch.overlay"}, "cloudletfs overlay info - "},
		{[]string{"overlay"}, "cloudletfs overlay - create, capture"},
		{[]string{"replay", "--help"}, "--trace"},
	} {
		stdout, stderr, code := run(c.args...)
		if code != 0 || !strings.Contains(stdout, c.want) || stderr != "" {
			t.Errorf("cloudletfs %s: exit %d, stdout %q..., stderr %q; want exit 0 and %q", strings.Join(c.args, " "), code, head(stdout), stderr, c.want)
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"x"}, `cloudletfs: unknown command "x"; see cloudletfs --help` + "\n"},
		{[]string{"help", "x"}, `cloudletfs: unknown command "x"; see cloudletfs --help` + "\n"},
		{[]string{"overlay", "x"}, `cloudletfs: unknown command "overlay x"; see cloudletfs overlay --help` + "\n"},
		{[]string{"replay", "--rtt", "-20ms"}, "cloudletfs: replay: --rtt -20ms: want a duration of zero or more, such as 20ms (see cloudletfs replay --help)\n"},
	} {
		stdout, stderr, code := run(c.args...)
		if code == 0 || stdout != "" || stderr != c.want {
			t.Errorf("cloudletfs %s: exit %d, stdout %q, stderr %q; want a non-zero exit and %q", strings.Join(c.args, " "), code, head(stdout), stderr, c.want)
		}
	}
}

// head is the start of a long output, for a failure message.
func head(s string) string {
	if len(s) > 80 {
		return s[:80]
	}
	return s
}

// TestTraceFlagOneName: the commands that read access traces all take
// them as --trace; the names they had before still work.
func TestTraceFlagOneName(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.write("t.trace", []byte("0.1 disk 5\n0.2 memory 1\n"))
	tr := e.path("t.trace")
	e.create("a.overlay", "--trace", tr)
	e.create("b.overlay", "--order", tr)
	if !bytes.Equal(e.read("a.overlay"), e.read("b.overlay")) {
		t.Fatal("--trace and --order give different overlays")
	}
	e.ok("overlay", "reorder", e.path("a.overlay"), "--trace", tr, "-o", e.path("c.overlay"))
	if out := e.ok("replay", "--overlay", e.path("a.overlay"), "--trace", tr); !strings.Contains(out, "stall") || !strings.Contains(out, "wait total") {
		t.Fatalf("replay does not show stall and wait total:\n%s", out)
	}
	for _, cmd := range [][]string{{"overlay", "create"}, {"overlay", "reorder"}, {"replay"}} {
		if out := e.ok(append(cmd, "--help")...); !strings.Contains(out, "--trace ") {
			t.Errorf("%s --help does not show --trace:\n%s", strings.Join(cmd, " "), out)
		}
	}
}

// TestPositionalTableNamesCommands keeps the table of positional arguments
// in step with the commands: a name in it that no command has would leave
// the command it meant refusing its arguments.
func TestPositionalTableNamesCommands(t *testing.T) {
	names := map[string]bool{}
	var walk func(path string, cmds []*cli.Command)
	walk = func(path string, cmds []*cli.Command) {
		for _, c := range cmds {
			full := strings.TrimSpace(path + " " + c.Name)
			names[full] = true
			walk(full, c.Subcommands)
		}
	}
	walk("", newApp(io.Discard, io.Discard).Commands)
	for name := range positional {
		if !names[name] {
			t.Errorf("positional names %q, which is not a command", name)
		}
	}
}
