package qemu

import (
	"context"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestPlain(t *testing.T) {
	for in, want := range map[string]string{
		"\x1b[?2004lapp-ready":                        "app-ready",
		"\x1b[?2004hroot@debian:~# ":                  "root@debian:~# ",
		"\x1b]0;root@debian: ~\x07root@debian:~# ":    "root@debian:~# ",
		"\x1b]2;title\x1b\\done":                      "done",
		"\x1b[1;32mOK\x1b[0m] Started nginx":          "OK] Started nginx",
		"\x1b=\x1b(Bready\x1b>":                       "ready",
		"\x1bP1$r0m\x1b\\ready":                       "ready",
		"[  OK  ] plain text stays [as it is]":        "[  OK  ] plain text stays [as it is]",
		"login: \x1b[K":                               "login: ",
		"caf\u00e9 \x1b[38;2;255;0;0mred\x1b[m bytes": "caf\u00e9 red bytes",
	} {
		if got := plain(in); got != want {
			t.Errorf("plain(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestReadyThroughEscapes feeds WaitConsole what Debian's bash sends on a
// serial console after a script ends: the prompt wrapped in
// bracketed-paste codes, then the line the script printed, behind the code
// that ends bracketed paste. A --ready of '^app-ready' must match it. The
// console is a pipe: QEMU without a guest prints no such lines.
func TestReadyThroughEscapes(t *testing.T) {
	v := &VM{changed: make(chan struct{}), exited: make(chan struct{})}
	r, w := io.Pipe()
	defer w.Close()
	go v.read(r, nil, guestConsole)
	go io.WriteString(w, "\x1b[?2004h\x1b]0;root@debian: ~\x07root@debian:~# ./install.sh\r\n"+
		"\x1b[?2004l\r\x1b[?2004lapp-ready\r\n\x1b[?2004hroot@debian:~# ")
	if err := v.WaitConsole(context.Background(), regexp.MustCompile(`^app-ready$`), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// A prompt not yet ended by a newline is matched too.
	if err := v.WaitConsole(context.Background(), regexp.MustCompile(`^root@debian:~# $`), 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// QEMU's own messages come on a stream of their own: one printed while the
// guest prints a line does not cut that line, and is not matched, but a
// failure shows it.
func TestQEMUMessagesApartFromConsole(t *testing.T) {
	v := &VM{changed: make(chan struct{}), exited: make(chan struct{})}
	cr, cw := io.Pipe()
	mr, mw := io.Pipe()
	defer cw.Close()
	defer mw.Close()
	go v.read(cr, nil, guestConsole)
	go v.read(mr, nil, qemuMessages)
	// Each piece is kept before the next is sent: the message arrives
	// while the guest's line is half printed.
	send := func(w io.Writer, s string) {
		v.mu.Lock()
		changed := v.changed
		v.mu.Unlock()
		io.WriteString(w, s)
		<-changed
	}
	send(cw, "app-re")
	send(mw, "qemu-system-x86_64: ram_block_discard_range: Failed to fallocate :0 +200000 (-95)\n")
	send(cw, "ady\n")
	if err := v.WaitConsole(context.Background(), regexp.MustCompile(`^app-ready$`), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	err := v.WaitConsole(context.Background(), regexp.MustCompile(`Failed to fallocate`), 50*time.Millisecond)
	if err == nil {
		t.Fatal("a QEMU message matched as a console line")
	}
	if !strings.Contains(err.Error(), "Failed to fallocate") {
		t.Fatalf("the failure does not show QEMU's message: %v", err)
	}
}
