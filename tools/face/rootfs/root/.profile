# The root shell on the serial console says when it is at the prompt: only
# then can lines typed into the console reach it, and not getty or login.
if [ "$(tty)" = /dev/ttyS0 ]; then
  stty cols 1000 rows 50 2>/dev/null
  bind 'set enable-bracketed-paste off' 2>/dev/null
  PS1='face# '
  echo face-base-ready
fi
