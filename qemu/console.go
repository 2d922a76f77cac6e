package qemu

import "regexp"

// escapes matches the terminal escape sequences a guest's console carries
// between the characters a user reads: CSI sequences such as colours and
// bracketed-paste mode (ESC [ ... final byte), OSC sequences such as window
// titles (ESC ] ... BEL or ESC \), the other string sequences (DCS, SOS, PM,
// APC: ESC P/X/^/_ ... ESC \), and the short escapes (ESC, intermediate
// bytes, one final byte), such as ESC = and ESC ( B.
var escapes = regexp.MustCompile(`\x1b\[[0-?]*[ -/]*[@-~]` +
	`|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)` +
	`|\x1b[PX^_][^\x1b]*\x1b\\` +
	`|\x1b[ -/]*[0-~]`)

// plain is a console line as a user reads it on a terminal: escape
// sequences removed. Debian's bash on a serial console wraps its prompt in
// bracketed-paste codes, so the line a user sees as "app-ready" arrives as
// "ESC[?2004lapp-ready"; --ready patterns are matched against plain lines.
func plain(line string) string {
	return escapes.ReplaceAllString(line, "")
}
